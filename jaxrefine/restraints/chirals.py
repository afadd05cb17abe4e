"""Chiral-volume restraints.

V = (x₁ − x_c)·((x₂ − x_c) × (x₃ − x_c)) for the centre x_c and its three listed neighbours
(monomer library convention; Vagin et al. 2004, Acta Cryst. D60, 2184).  E = Σ mask ((V − V₀)/σ)²
with V₀ = +|V_ideal| ("positive"), −|V_ideal| ("negative"), or sign(V)·|V_ideal| ("both"), as in
REFMAC5 (Murshudov et al. 2011, Acta Cryst. D67, 355).
"""
from __future__ import annotations

import jax.numpy as jnp

from ..core.device import array_module
from ..core.restraint_terms import ChiralTerm


def chiral_volumes(xyz_cart, chiral: ChiralTerm):
    """(nc,) signed chiral volumes (Å³)."""
    xp = array_module(xyz_cart, *chiral)
    c = xyz_cart[chiral.idx[:, 0]]
    a, b, d = (xyz_cart[chiral.idx[:, k]] - c for k in (1, 2, 3))
    return xp.sum(a * xp.cross(b, d), axis=-1)


def chiral_targets(volumes, chiral: ChiralTerm):
    """(nc,) target volumes: ±ideal by the dictionary sign, the current sign for "both"."""
    xp = array_module(volumes, *chiral)
    sign = xp.where(chiral.sign == 0, xp.where(volumes >= 0, 1.0, -1.0), chiral.sign)
    return sign * chiral.ideal


def chiral_energy(xyz_cart, chiral: ChiralTerm):
    """Σ mask ((V − V₀)/σ)²."""
    v = chiral_volumes(xyz_cart, chiral)
    z = (v - chiral_targets(v, chiral)) / chiral.sigma
    return jnp.sum(chiral.mask * z * z)
