"""Riding hydrogens inside the energy: positions, B and occupancy from their heavy atoms (pure JAX).

A hydrogen rides on its parent P and two reference atoms A, B (see :mod:`jaxrefine.io.hydrogens`):

    u = (A − P)/|A − P|,  v = normalised part of (B − P) orthogonal to u,  w = u × v,
    H = P + c_u u + c_v v + c_w w,

with (c_u, c_v, c_w) fixed at setup from the library's ideal position, so bond length, angles and
torsion of H follow the heavy atoms exactly and the gradient flows back to P, A and B.  Its B is
``b_factor`` × B(P) and its occupancy that of P (REFMAC and gemmi give H the parent's B).

:func:`scattering_atoms` is what F_calc sees: the refined atoms followed by their riding hydrogens.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core.device import on_device

H_B_FACTOR = 1.0  # B(H) / B(parent): gemmi and servalcat place H with the parent's B
_EPS = 1e-12  # keeps the normalisations differentiable when two atoms coincide


class Riding(NamedTuple):
    """Riding-hydrogen arrays (a pytree; part of the problem).

    Attributes:
        parent, ref_a, ref_b: (n_h,) int atom indices of P, A, B.
        local: (n_h, 3) coordinates of each hydrogen in its frame (Å).
        b_factor: () B(H)/B(P).
        h_serial: (n_h,) int number of each hydrogen in gemmi's placement (not used in the energy;
            :func:`jaxrefine.io.hydrogens.riding_sites` refreshes ``local`` with it).
    """

    parent: jax.Array
    ref_a: jax.Array
    ref_b: jax.Array
    local: jax.Array
    b_factor: jax.Array
    h_serial: jax.Array


def riding_from_sites(sites, dtype=jnp.float32, b_factor: float = H_B_FACTOR) -> Riding:
    """:class:`Riding` from :class:`jaxrefine.io.hydrogens.RidingSites` (numpy -> JAX arrays)."""
    return Riding(
        parent=on_device(sites.parent, jnp.int32), ref_a=on_device(sites.ref_a, jnp.int32),
        ref_b=on_device(sites.ref_b, jnp.int32), local=on_device(sites.local, dtype),
        b_factor=on_device(b_factor, dtype), h_serial=on_device(sites.h_serial, jnp.int32),
    )


def _unit(x):
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + _EPS)


def riding_xyz(xyz_cart, riding: Riding):
    """(n_h, 3) Cartesian positions (Å) of the riding hydrogens for heavy-atom positions (n, 3)."""
    p = xyz_cart[riding.parent]
    u = _unit(xyz_cart[riding.ref_a] - p)
    t = xyz_cart[riding.ref_b] - p
    v = _unit(t - jnp.sum(t * u, axis=-1, keepdims=True) * u)
    w = jnp.cross(u, v)
    c = riding.local
    return p + c[:, :1] * u + c[:, 1:2] * v + c[:, 2:3] * w


def scattering_atoms(xyz_cart, b_iso, occ, riding: Riding | None, b_parent=None):
    """The atoms F_calc sums over: (xyz_cart, b_iso, occ) of the refined atoms followed by their
    riding hydrogens; unchanged when ``riding`` is None.  ``b_parent`` (n,): the B the hydrogens take
    from their parent (``b_iso`` when None; an anisotropic or TLS parent's B_eq)."""
    if riding is None:
        return xyz_cart, b_iso, occ
    b_parent = b_iso if b_parent is None else b_parent
    xyz_h = riding_xyz(xyz_cart, riding)
    return (jnp.concatenate([xyz_cart, xyz_h]), jnp.concatenate([b_iso, riding.b_factor * b_parent[riding.parent]]),
            jnp.concatenate([occ, occ[riding.parent]]))


def refreshed_riding(riding: Riding, model, xyz_cart, monlib=None, ligands=()) -> Riding:
    """``riding`` with local coordinates re-derived from gemmi's placement on the heavy atoms at
    ``xyz_cart`` (n, 3) Å (outside jit, between macrocycles; same hydrogens and frames, so the same
    shapes).  A start far from ideal geometry (a shaken model) gives distorted local coordinates;
    refreshing them as the geometry improves keeps the hydrogens where the library puts them."""
    from ..io.hydrogens import riding_sites

    sites = riding_sites(model, monlib, ligands, xyz_cart=np.asarray(xyz_cart, float), like=riding)
    return riding._replace(local=on_device(sites.local, riding.local.dtype))


def riding_problem(problem, model, xyz_cart, monlib=None, ligands=()):
    """The problem with its riding hydrogens refreshed (see :func:`refreshed_riding`); unchanged
    when it has none."""
    if getattr(problem, "riding", None) is None:
        return problem
    return problem._replace(riding=refreshed_riding(problem.riding, model, xyz_cart, monlib, ligands))
