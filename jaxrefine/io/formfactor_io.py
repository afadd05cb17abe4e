"""Form-factor tables from gemmi (IT92) -> :class:`jaxrefine.xray.formfactors.FormFactors`."""
from __future__ import annotations

import gemmi
import numpy as np

from ..errors import InputError
from ..xray.formfactors import FormFactors


def it92_form_factors(elements, source: str = "") -> FormFactors:
    """IT92 coefficients (International Tables Vol. C, Table 6.1.1.4, via gemmi) for each atom.

    Args:
        elements: (n_atoms,) element symbols.
        source: file name for messages.
    """
    elements = np.asarray(elements).astype(str)
    types, type_index = np.unique(elements, return_inverse=True)
    a, b, c = [], [], []
    for el in types:
        e = gemmi.Element(el)
        if e.atomic_number == 0 or not e.it92.a:
            raise InputError(f"{source}: no IT92 form factor for element {el!r}; fix the element column of the model")
        a.append(e.it92.a)
        b.append(e.it92.b)
        c.append(e.it92.c)
    return FormFactors(
        a=np.array(a, float), b=np.array(b, float), c=np.array(c, float), type_index=type_index.astype(np.int32)
    )
