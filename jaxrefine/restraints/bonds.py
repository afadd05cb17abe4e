"""Bond-length and bond-angle restraints.

E_bond = Σ mask ((d − d₀)/σ)², E_angle = Σ mask ((θ − θ₀)/σ)² (harmonic restraints of the
REFMAC5 geometry target; Murshudov et al. 2011, Acta Cryst. D67, 355, eq. 6; ideal values from
the monomer library or Engh & Huber 2001).
"""
from __future__ import annotations

import jax.numpy as jnp

from ..core.device import array_module
from ..core.restraint_terms import AngleTerm, BondTerm


def bond_lengths(xyz_cart, bond: BondTerm):
    """(nb,) distances (Å) of the bonded pairs; xyz_cart (n, 3) Å."""
    xp = array_module(xyz_cart, *bond)
    d = xyz_cart[bond.idx[:, 0]] - xyz_cart[bond.idx[:, 1]]
    # safe norm: padding rows point at (0, 0) and would give a NaN gradient through sqrt(0)
    return xp.sqrt(xp.sum(d * d, axis=-1) + (1.0 - bond.mask))


def bond_energy(xyz_cart, bond: BondTerm):
    """Σ mask ((d − ideal)/σ)² over bonds (dimensionless)."""
    z = (bond_lengths(xyz_cart, bond) - bond.ideal) / bond.sigma
    return jnp.sum(bond.mask * z * z)


def bond_angles(xyz_cart, angle: AngleTerm):
    """(na,) angles (radians) at the middle atom, via atan2(|u×v|, u·v) (stable near 0 and π)."""
    xp = array_module(xyz_cart, *angle)
    u = xyz_cart[angle.idx[:, 0]] - xyz_cart[angle.idx[:, 1]]
    v = xyz_cart[angle.idx[:, 2]] - xyz_cart[angle.idx[:, 1]]
    pad = (1.0 - angle.mask)[:, None]
    u = u + pad * xp.array([1.0, 0.0, 0.0], u.dtype)  # padding rows: a harmless right angle
    v = v + pad * xp.array([0.0, 1.0, 0.0], v.dtype)
    c = xp.cross(u, v)
    return xp.arctan2(xp.sqrt(xp.sum(c * c, axis=-1) + 1e-30), xp.sum(u * v, axis=-1))


def angle_energy(xyz_cart, angle: AngleTerm):
    """Σ mask ((θ − ideal)/σ)² over angles, θ and σ in radians."""
    z = (bond_angles(xyz_cart, angle) - angle.ideal) / angle.sigma
    return jnp.sum(angle.mask * z * z)
