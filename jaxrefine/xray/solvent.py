"""The flat bulk-solvent term (F_mask itself is the transform of the mask grid: structure_factors.f_from_grid).

F_bulk(h) = k_sol · exp(−B_sol s²/4) · F_mask(h)     (Jiang & Brünger 1994, J. Mol. Biol. 243, 100;
Fokine & Urzhumtsev 2002, Acta Cryst. D58, 1387, eq. 1).
"""
from __future__ import annotations

from ..core.device import array_module


def bulk_solvent_factor(k_sol, b_sol, s2):
    """k_sol · exp(−B_sol s²/4) per reflection (numpy for numpy arguments, :func:`jaxrefine.core.device.array_module`).

    Args:
        k_sol: scalar solvent density scale (e/Å³ relative to the mask value 1).
        b_sol: scalar solvent B (Å²).
        s2: (n_refl,) 1/d² (Å⁻²).
    """
    xp = array_module(k_sol, b_sol, s2)
    return k_sol * xp.exp(-b_sol * xp.asarray(s2) / 4.0)


def bulk_solvent(f_mask, k_sol, b_sol, s2):
    """F_bulk = k_sol exp(−B_sol s²/4) F_mask; (n_refl,) complex."""
    return bulk_solvent_factor(k_sol, b_sol, s2) * f_mask
