"""Form-factor tables from gemmi -> :class:`jaxrefine.xray.formfactors.FormFactors`.

Tables (all as sums of Gaussians, f(s) = Σ a_k exp(−b_k s²/4) + c):

* ``"it92"``: X-ray, International Tables Vol. C (1992), Table 6.1.1.4 (4 Gaussians + c);
* ``"electron"``: electron, International Tables Vol. C, Table 4.3.2.2 (Peng et al. 1996,
  Acta Cryst. A52, 257; 5 Gaussians, c = 0);
* ``"neutron"``: coherent scattering lengths (Sears 1992, Neutron News 3, 26; fm), constant in s.
"""
from __future__ import annotations

import gemmi
import numpy as np

from ..errors import InputError
from ..core.formfactors import FormFactors

TABLES = ("it92", "electron", "neutron")


def _coefficients(el: str, table: str):
    e = gemmi.Element(el)
    if e.atomic_number == 0:
        return None
    if table == "it92":
        if not e.it92.a:
            return None
        return list(e.it92.a), list(e.it92.b), float(e.it92.c)
    if table == "electron":
        if not e.c4322.a:
            return None
        return list(e.c4322.a), list(e.c4322.b), 0.0
    coefs = e.neutron92.get_coefs()  # [b_coh] (fm)
    return [0.0], [0.0], float(coefs[0])


def form_factors(elements, table: str = "it92", source: str = "") -> FormFactors:
    """Gaussian form-factor coefficients of a table for each atom.

    Args:
        elements: (n_atoms,) element symbols.
        table: one of TABLES.
        source: file name for messages.
    """
    if table not in TABLES:
        raise InputError(f"{source}: unknown form-factor table {table!r}; use one of {', '.join(TABLES)}")
    elements = np.asarray(elements).astype(str)
    types, type_index = np.unique(elements, return_inverse=True)
    a, b, c = [], [], []
    for el in types:
        coef = _coefficients(el, table)
        if coef is None:
            raise InputError(f"{source}: no {table} form factor for element {el!r}; fix the element column of the model")
        a.append(coef[0])
        b.append(coef[1])
        c.append(coef[2])
    return FormFactors(
        a=np.array(a, float), b=np.array(b, float), c=np.array(c, float), type_index=type_index.astype(np.int32).reshape(-1)
    )


def it92_form_factors(elements, source: str = "") -> FormFactors:
    """IT92 coefficients (International Tables Vol. C, Table 6.1.1.4, via gemmi) for each atom."""
    return form_factors(elements, "it92", source)
