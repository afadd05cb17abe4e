"""F_model: the model structure factors compared with the data (pure JAX).

F_model(h) = k_total(h) · (F_calc(h) + k_sol · exp(−B_sol s²/4) · F_mask(h)),
k_total(h) = k_overall · exp(−¼ sᵀ B_cart s)

(Afonine et al. 2013, Acta Cryst. D69, 625; Jiang & Brünger 1994, J. Mol. Biol. 243, 100).
The fit of the scales, mask and σA around it lives in :mod:`jaxrefine.problem.fmodel`.
"""
from __future__ import annotations

from ..core.device import array_module
from .scaling import Scales, k_total
from .solvent import bulk_solvent


def f_model(f_calc, f_mask, s_cart, scales: Scales):
    """k_total(s) · (F_calc + k_sol exp(−B_sol s²/4) F_mask); pure JAX, or numpy when no argument is a JAX array
    (:func:`jaxrefine.core.device.array_module`: host code, no program).

    Args:
        f_calc: (n,) complex atomic-model structure factors.
        f_mask: (n,) complex solvent-mask structure factors.
        s_cart: (n, 3) Cartesian reciprocal vectors (Å⁻¹), :func:`reciprocal_vectors`.
        scales: :class:`Scales`.

    Returns:
        (n,) complex F_model.
    """
    xp = array_module(f_calc, f_mask, s_cart, scales)
    s_cart = xp.asarray(s_cart)
    s2 = xp.sum(s_cart**2, axis=1)
    return k_total(scales, s_cart) * (f_calc + bulk_solvent(f_mask, scales.k_sol, scales.b_sol, s2))

