"""Planarity restraints: squared distances of atoms to their least-squares plane.

E = Σ_planes mask Σ_i (n·(x_i − c))² / σ², where c is the centroid and n the unit normal of the
least-squares plane (eigenvector of the smallest eigenvalue of the scatter matrix; Blow 1960,
Acta Cryst. 13, 168; REFMAC5: Murshudov et al. 2011).  The normal's derivative is first-order
perturbation theory of the smallest eigenvector, written with a 3×3 solve instead of the full
eigenvector derivative of ``eigh`` (which divides by the differences of *all* eigenvalue pairs and is
undefined for a ring's two equal in-plane eigenvalues).  Since the normal minimises the sum, it
adds nothing to the gradient (envelope theorem), but it is the part of the Hessian that a held
normal misses (10% of H·v on 5e5z's coordinates; the curvature is what uncertainties and implicit
derivatives use).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..core.device import array_module
from ..core.restraint_terms import PlaneTerm


@jax.custom_jvp
def smallest_eigenvector(s):
    """(..., 3) unit eigenvector of the smallest eigenvalue of the symmetric (..., 3, 3) ``s``."""
    _, vec = jnp.linalg.eigh(s)
    return vec[..., :, 0]


@smallest_eigenvector.defjvp
def _smallest_eigenvector_jvp(primals, tangents):
    # dn = −P (S − λ₀ + n nᵀ)⁻¹ P dS n with P = 1 − n nᵀ: Σ_{j>0} v_j v_jᵀ dS n / (λ₀ − λ_j) in closed
    # form; needs only λ₀ to be simple, and differentiates again through this same rule.
    (s,), (ds,) = primals, tangents
    n = smallest_eigenvector(s)
    lam = jnp.einsum("...i,...ij,...j->...", n, s, n)
    nn = n[..., :, None] * n[..., None, :]
    p = jnp.eye(3, dtype=s.dtype) - nn
    m = s - lam[..., None, None] * jnp.eye(3, dtype=s.dtype) + nn
    rhs = jnp.einsum("...ij,...jk,...k->...i", p, ds, n)
    dn = -jnp.einsum("...ij,...j->...i", p, jnp.linalg.solve(m, rhs[..., None])[..., 0])
    return n, dn


def plane_distances(xyz_cart, plane: PlaneTerm):
    """(np, max_atoms) signed distances (Å) of each plane atom to its least-squares plane."""
    xp = array_module(xyz_cart, *plane)
    pts = xyz_cart[plane.idx]  # (np, k, 3)
    w = plane.atom_mask[..., None]
    n_at = xp.maximum(plane.atom_mask.sum(-1), 1.0)[:, None]
    c = (pts * w).sum(1) / n_at
    r = (pts - c[:, None, :]) * w
    scatter = xp.einsum("pki,pkj->pij", r, r)
    # padding planes have zero scatter: add a fixed, non-degenerate diagonal so eigh is defined
    pad = (1.0 - plane.mask)[:, None, None] * xp.diag(xp.array([3.0, 2.0, 1.0], pts.dtype))
    # on the host (numpy input) numpy's eigh: the same normal (the eigenvector's sign cancels in the square)
    normal = smallest_eigenvector(scatter + pad) if xp is jnp else np.linalg.eigh(scatter + pad)[1][..., :, 0]
    return xp.einsum("pki,pi->pk", r, normal)


def plane_energy(xyz_cart, plane: PlaneTerm):
    """Σ mask Σ_i dist_i² / σ² over planes."""
    dist = plane_distances(xyz_cart, plane)
    return jnp.sum(plane.mask * jnp.sum(dist * dist, axis=-1) / plane.sigma**2)
