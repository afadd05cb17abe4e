"""Planarity restraints: squared distances of atoms to their least-squares plane.

E = Σ_planes mask Σ_i (n·(x_i − c))² / σ², where c is the centroid and n the unit normal of the
least-squares plane (eigenvector of the smallest eigenvalue of the scatter matrix; Blow 1960,
Acta Cryst. 13, 168; REFMAC5: Murshudov et al. 2011).  The normal is held fixed when
differentiating (``stop_gradient``): since it minimises the sum, the envelope theorem makes this
the exact gradient, and it avoids the unstable eigenvector derivative.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..core.restraint_terms import PlaneTerm


def plane_distances(xyz_cart, plane: PlaneTerm):
    """(np, max_atoms) signed distances (Å) of each plane atom to its least-squares plane."""
    pts = xyz_cart[plane.idx]  # (np, k, 3)
    w = plane.atom_mask[..., None]
    n_at = jnp.maximum(plane.atom_mask.sum(-1), 1.0)[:, None]
    c = (pts * w).sum(1) / n_at
    r = (pts - c[:, None, :]) * w
    scatter = jnp.einsum("pki,pkj->pij", r, r)
    # padding planes have zero scatter: add a fixed, non-degenerate diagonal so eigh is defined
    pad = (1.0 - plane.mask)[:, None, None] * jnp.diag(jnp.array([3.0, 2.0, 1.0], pts.dtype))
    _, vec = jnp.linalg.eigh(jax.lax.stop_gradient(scatter + pad))
    normal = vec[:, :, 0]
    return jnp.einsum("pki,pi->pk", r, normal)


def plane_energy(xyz_cart, plane: PlaneTerm):
    """Σ mask Σ_i dist_i² / σ² over planes."""
    dist = plane_distances(xyz_cart, plane)
    return jnp.sum(plane.mask * jnp.sum(dist * dist, axis=-1) / plane.sigma**2)
