"""Torsion-angle restraints with the dictionary's periodicity.

E = Σ mask (Δ/σ)² with Δ = (φ − φ₀) reduced to the nearest of the ``period`` equivalent
minima, i.e. into [−π/period, π/period) — the periodic harmonic form of REFMAC5 and servalcat
(Murshudov et al. 2011, Acta Cryst. D67, 355; Vagin et al. 2004, Acta Cryst. D60, 2184).
"""
from __future__ import annotations

import jax.numpy as jnp

from ..core.device import array_module
from ..core.restraint_terms import TorsionTerm


def dihedrals(xyz_cart, idx, mask):
    """(nt,) dihedral angles (radians, IUPAC sign) of atoms idx (nt, 4) via atan2 (Blondel &
    Karplus 1996, J. Comput. Chem. 17, 1132)."""
    xp = array_module(xyz_cart, mask)
    p0, p1, p2, p3 = (xyz_cart[idx[:, k]] for k in range(4))
    pad = (1.0 - mask)[:, None]
    b0 = p1 - p0 + pad * xp.array([1.0, 0.0, 0.0], p0.dtype)
    b1 = p2 - p1 + pad * xp.array([0.0, 1.0, 0.0], p0.dtype)
    b2 = p3 - p2 + pad * xp.array([0.0, 0.0, 1.0], p0.dtype)
    n1 = xp.cross(b0, b1)  # normal of plane (p0, p1, p2)
    n2 = xp.cross(b1, b2)
    b1n = b1 / xp.linalg.norm(b1, axis=-1, keepdims=True)
    x = xp.sum(n1 * n2, axis=-1)
    y = xp.sum(xp.cross(n1, n2) * b1n, axis=-1)
    return xp.arctan2(y, x)


def torsion_deviations(xyz_cart, torsion: TorsionTerm):
    """(nt,) φ − φ₀ (radians) reduced to the nearest periodic minimum."""
    phi = dihedrals(xyz_cart, torsion.idx, torsion.mask)
    xp = array_module(phi, *torsion)
    step = (2.0 * xp.pi / torsion.period).astype(phi.dtype)
    d = phi - torsion.ideal
    return d - step * xp.round(d / step)


def torsion_energy(xyz_cart, torsion: TorsionTerm):
    """Σ mask ((Δφ)/σ)², Δφ periodic (see module docstring)."""
    z = torsion_deviations(xyz_cart, torsion) / torsion.sigma
    return jnp.sum(torsion.mask * z * z)
