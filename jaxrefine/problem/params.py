"""Refinable parameters (a pytree) and their map to atomic quantities.

``Params`` holds what a minimiser changes; everything else lives in the static problem.

- ``xyz_frac`` (n, 3): fractional coordinates, the primary positional variables.
- ``b_raw`` (n,): unconstrained B parameter, B = b_min + softplus(b_raw) (Å²), so B stays positive
  and the map is smooth (softplus(x) = log(1 + e^x) ≈ x for large x).
- ``occ_raw`` (n_groups,): occupancy logits of the refinable occupancy groups (altloc conformers,
  partially occupied ligands).  Conformers of one residue form a set whose occupancies keep their
  starting sum (softmax); a set with a single group uses a sigmoid.
- ``rot`` (n_bodies, 3): rotation vectors (axis × angle, radians) of rigid bodies about their centres (no bodies,
  shape (0, 3), where no macrocycle refines them).
- ``trans`` (n_bodies, 3): rigid-body translations (Å).
- ``u_raw`` (n_aniso, 6): Cholesky parameters of the anisotropic U of the atoms refined
  anisotropically (``refine.adp=aniso``), None otherwise; see :mod:`jaxrefine.problem.adp_model`.
- ``tls_raw`` (n_groups, 21): Cholesky parameters of each TLS group's joint (T, L, S) covariance
  (``refine.adp=tls``; ``b_raw`` is then the residual isotropic B), None otherwise.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core.device import array_module


class Params(NamedTuple):
    xyz_frac: jax.Array
    b_raw: jax.Array
    occ_raw: jax.Array
    rot: jax.Array
    trans: jax.Array
    u_raw: Any = None
    tls_raw: Any = None


class AtomMaps(NamedTuple):
    """Static arrays that turn Params into per-atom quantities (part of the problem pytree).

    Attributes:
        orth, frac: (3, 3) cell matrices.
        body_index: (n,) int rigid body of each atom.
        body_centre: (n_bodies, 3) Cartesian centre (Å) of each body.
        body_radius: (n_bodies,) radius of gyration (Å); rotations are optimised as arcs
            (radius × angle, Å) so they are on the scale of translations.
        occ0: (n,) starting occupancies (used for atoms outside any occupancy group).
        occ_group: (n,) int group of each atom, -1 when its occupancy is fixed.
        group_set: (n_groups,) int set of each group (conformers of one residue share a set).
        set_total: (n_sets,) occupancy sum each set keeps.
        set_size: (n_sets,) number of groups in each set.
        b_min: scalar floor of B (Å²).
    """

    orth: jax.Array
    frac: jax.Array
    body_index: jax.Array
    body_centre: jax.Array
    body_radius: jax.Array
    occ0: jax.Array
    occ_group: jax.Array
    group_set: jax.Array
    set_total: jax.Array
    set_size: jax.Array
    b_min: jax.Array


def b_to_raw(b_iso, b_min):
    """Inverse of ``b_min + softplus(raw)`` (numpy), clamped so B > b_min."""
    x = np.maximum(np.asarray(b_iso, float) - float(b_min), 1e-3)
    return np.where(x > 30, x, np.log(np.expm1(x)))


def b_of(b_raw, b_min):
    """B (Å²) from the unconstrained parameter (numpy for numpy arguments: :func:`jaxrefine.core.device.array_module`)."""
    if array_module(b_raw, b_min) is np:
        return b_min + np.logaddexp(b_raw, 0.0)  # softplus
    return b_min + jax.nn.softplus(b_raw)


def rotation_matrix(rotvec):
    """Rodrigues' formula, (..., 3) rotation vectors (rad) -> (..., 3, 3), smooth at zero.

    Reference: e.g. Murray, Li & Sastry, A Mathematical Introduction to Robotic Manipulation
    (1994), eq. 2.14.  Near θ = 0 the Taylor series of sin θ/θ and (1 − cos θ)/θ² are used.
    """
    xp = array_module(rotvec)
    th2 = xp.sum(rotvec * rotvec, axis=-1)[..., None, None]
    small = th2 < 1e-8
    th2s = xp.where(small, 1.0, th2)
    th = xp.sqrt(th2s)
    a = xp.where(small, 1.0 - th2 / 6.0, xp.sin(th) / th)
    b = xp.where(small, 0.5 - th2 / 24.0, (1.0 - xp.cos(th)) / th2s)
    x, y, z = rotvec[..., 0], rotvec[..., 1], rotvec[..., 2]
    zero = xp.zeros_like(x)
    k = xp.stack([xp.stack([zero, -z, y], -1), xp.stack([z, zero, -x], -1), xp.stack([-y, x, zero], -1)], -2)
    eye = xp.eye(3, dtype=rotvec.dtype)
    return eye + a * k + b * (k @ k)


def atom_xyz(params: Params, maps: AtomMaps):
    """Cartesian (Å) and fractional coordinates after the rigid-body transforms.

    Returns:
        xyz_cart (n, 3), xyz_frac (n, 3)
    """
    cart0 = params.xyz_frac @ maps.orth.T
    if params.rot.shape[0] == 0:  # no rigid bodies (jaxrefine.problem.setup.uses_rigid_bodies): the atoms as they are
        return cart0, params.xyz_frac
    r = rotation_matrix(params.rot)[maps.body_index]  # (n, 3, 3)
    c = maps.body_centre[maps.body_index]
    xp = array_module(params.rot, params.trans, params.xyz_frac, maps.orth, maps.body_centre)
    cart = xp.einsum("nij,nj->ni", r, cart0 - c) + c + params.trans[maps.body_index]
    return cart, cart @ maps.frac.T


def atom_occ(params: Params, maps: AtomMaps):
    """(n,) occupancies: fixed atoms keep occ0; grouped atoms follow their logits."""
    if params.occ_raw.shape[0] == 0:
        return maps.occ0
    n_sets = maps.set_total.shape[0]
    logits = params.occ_raw
    xp = array_module(logits, maps.occ0, maps.set_total)
    if xp is np:  # the host's segment reductions
        set_max = np.full(n_sets, -np.inf, logits.dtype)
        np.maximum.at(set_max, maps.group_set, logits)
        e = np.exp(logits - set_max[maps.group_set])
        denom = np.bincount(maps.group_set, e, n_sets).astype(logits.dtype)[maps.group_set]
        sigmoid = 1.0 / (1.0 + np.exp(-logits))
    else:
        set_max = jax.ops.segment_max(logits, maps.group_set, num_segments=n_sets)
        e = jnp.exp(logits - set_max[maps.group_set])
        denom = jax.ops.segment_sum(e, maps.group_set, num_segments=n_sets)[maps.group_set]
        sigmoid = jax.nn.sigmoid(logits)
    single = maps.set_size[maps.group_set] == 1
    frac_in_set = xp.where(single, sigmoid, e / denom)
    group_occ = frac_in_set * xp.where(single, 1.0, maps.set_total[maps.group_set])
    g = xp.maximum(maps.occ_group, 0)
    return xp.where(maps.occ_group >= 0, group_occ[g], maps.occ0)


def atom_b(params: Params, maps: AtomMaps):
    return b_of(params.b_raw, maps.b_min)


def occupancy_groups(model, refine_partial: bool = True):
    """Occupancy groups from altlocs (and partially occupied residues).

    Conformers (altloc letters) of one residue are groups of one set, whose occupancies keep their
    starting sum.  A residue without altlocs whose atoms have occupancy < 1 is a one-group set
    (refined in (0, 1) by a sigmoid) when ``refine_partial``.

    Returns:
        occ_group (n,) int (-1 = fixed), group_set (n_groups,), set_total (n_sets,), set_size (n_sets,),
        group_start (n_groups,) starting occupancy of each group.
    """
    n = model.n_atoms
    occ_group = -np.ones(n, np.int32)
    group_set, set_total, set_size, group_start = [], [], [], []
    keys = {}
    for i in range(n):
        res = model.res_index[i]
        alt = model.altloc[i]
        if alt:
            key = (res, alt)
        elif refine_partial and model.occ[i] < 0.999 and model.kind[i] != "water":
            key = (res, "")
        else:
            continue
        if key not in keys:
            keys[key] = len(keys)
            group_start.append(model.occ[i])
        occ_group[i] = keys[key]
    sets = {}
    for (res, alt), g in sorted(keys.items(), key=lambda kv: kv[1]):
        s = sets.setdefault(res, len(sets))
        group_set.append(s)
    group_set = np.array(group_set, np.int32)
    group_start = np.array(group_start, float)
    n_sets = len(sets)
    set_size = np.bincount(group_set, minlength=n_sets).astype(np.int32) if n_sets else np.zeros(0, np.int32)
    set_total = np.minimum(np.bincount(group_set, weights=group_start, minlength=n_sets), 1.0) if n_sets else np.zeros(0)
    return occ_group, group_set, set_total, set_size, group_start


def occ_to_raw(group_start, group_set, set_total, set_size):
    """Logits that reproduce the starting group occupancies."""
    p = np.clip(group_start, 1e-3, 1 - 1e-3)
    single = set_size[group_set] == 1 if len(group_set) else np.zeros(0, bool)
    share = np.clip(group_start / np.maximum(set_total[group_set], 1e-6), 1e-3, 1.0) if len(group_set) else p
    return np.where(single, np.log(p / (1 - p)), np.log(share))
