"""Atomic scattering factors as sums of Gaussians.

f0(s) = sum_k a_k exp(-b_k s^2 / 4) + c, with s = 1/d (Å^-1).
Coefficients: International Tables for Crystallography Vol. C (1992), Table 6.1.1.4
("IT92" four-Gaussian fit), as tabulated in gemmi (``gemmi.Element(el).it92``).
The table is read in :mod:`jaxrefine.io.formfactor_io`; this module only evaluates it.
"""
from __future__ import annotations

import jax.numpy as jnp

from ..core.formfactors import FormFactors


def f0(ff: FormFactors, s2):
    """Scattering factor of every type at 1/d^2 = s2.

    Args:
        ff: coefficients.
        s2: (n_refl,) 1/d^2 (Å^-2).

    Returns:
        (n_refl, n_types) f0 (electrons).
    """
    s2 = jnp.asarray(s2)
    return jnp.einsum("tg,rtg->rt", ff.a, jnp.exp(-ff.b[None] * s2[:, None, None] / 4.0)) + ff.c[None]
