"""E_geometry: the weighted sum of all stereochemical terms.

E = w_bond E_bond + w_angle E_angle + w_torsion E_torsion + w_plane E_plane + w_chiral E_chiral
    + w_nonbonded E_nonbonded, each term of the form Σ ((x − ideal)/σ)² (REFMAC5 geometry target,
Murshudov et al. 2011, Acta Cryst. D67, 355).  ADP restraints act on B and are separate
(:func:`jaxrefine.restraints.adp.adp_energy`).
"""
from __future__ import annotations

import jax.numpy as jnp

from .bonds import angle_energy, bond_angles, bond_energy, bond_lengths
from .chirals import chiral_energy, chiral_targets, chiral_volumes
from .nonbonded import NONBONDED_SIGMA, NonbondedList, nonbonded_energy, pair_distances
from .planes import plane_distances, plane_energy
from ..core.restraint_terms import GeometryWeights, Restraints
from .torsions import torsion_deviations, torsion_energy


def geometry_terms(xyz_cart, restraints: Restraints, nonbonded: NonbondedList | None = None, orth=None, frac=None) -> dict:
    """Unweighted energy of each term family (dict of scalars); xyz_cart (n, 3) Å."""
    terms = {
        "bond": bond_energy(xyz_cart, restraints.bond),
        "angle": angle_energy(xyz_cart, restraints.angle),
        "torsion": torsion_energy(xyz_cart, restraints.torsion),
        "plane": plane_energy(xyz_cart, restraints.plane),
        "chiral": chiral_energy(xyz_cart, restraints.chiral),
    }
    terms["nonbonded"] = nonbonded_energy(xyz_cart, nonbonded, orth, frac) if nonbonded is not None else jnp.zeros(())
    return terms


def geometry_energy(xyz_cart, restraints: Restraints, nonbonded: NonbondedList | None, weights: GeometryWeights, orth=None, frac=None):
    """Weighted geometry energy (scalar, dimensionless); pure JAX, jit-able and differentiable.

    Args:
        xyz_cart: (n_atoms, 3) Cartesian coordinates (Å).
        restraints: padded restraint arrays from :func:`jaxrefine.io.topology.build_restraints`.
        nonbonded: pair list from :func:`jaxrefine.problem.neighbours.build_nonbonded`, or None.
        weights: per-term weights; a weight of 0 switches a term off.
        orth, frac: (3, 3) cell matrices for symmetry mates (default: those stored in
            ``nonbonded``); pass them when the cell is a parameter.
    """
    terms = geometry_terms(xyz_cart, restraints, nonbonded, orth, frac)
    return sum(getattr(weights, k) * v for k, v in terms.items())


def geometry_residuals(xyz_cart, restraints: Restraints, nonbonded: NonbondedList | None, weights: GeometryWeights,
                       orth=None, frac=None):
    """The residual vector r of E_geometry: Σ r² = :func:`geometry_energy` (one entry per restraint, per plane atom
    and per non-bonded pair; padding rows 0).  Its Jacobian gives the Gauss–Newton matrix 2 JᵀJ of E_geometry,
    positive semi-definite where the exact Hessian is not (compressed bonds of a shaken model)."""
    b, a, t, p, c = restraints.bond, restraints.angle, restraints.torsion, restraints.plane, restraints.chiral
    root = lambda w, mask: jnp.sqrt(w * mask)  # noqa: E731
    v = chiral_volumes(xyz_cart, c)
    out = [root(weights.bond, b.mask) * (bond_lengths(xyz_cart, b) - b.ideal) / b.sigma,
           root(weights.angle, a.mask) * (bond_angles(xyz_cart, a) - a.ideal) / a.sigma,
           root(weights.torsion, t.mask) * torsion_deviations(xyz_cart, t) / t.sigma,
           (root(weights.plane, p.mask)[:, None] * plane_distances(xyz_cart, p) / p.sigma[:, None]).reshape(-1),
           root(weights.chiral, c.mask) * (v - chiral_targets(v, c)) / c.sigma]
    if nonbonded is not None:
        d = pair_distances(xyz_cart, nonbonded, orth, frac)
        out.append(jnp.sqrt(weights.nonbonded * nonbonded.weight) * jnp.maximum(nonbonded.d_min - d, 0.0) / NONBONDED_SIGMA)
    return jnp.concatenate([o.astype(xyz_cart.dtype) for o in out])
