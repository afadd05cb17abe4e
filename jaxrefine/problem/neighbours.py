"""The non-bonded neighbour list: pairs of atoms (symmetry mates included) near contact.

Built outside jit from the current coordinates and the restraint arrays (radii, bonded pairs,
altlocs, H-bond types of :mod:`jaxrefine.io.topology`), padded to a fixed capacity so that
rebuilding it between macrocycles does not recompile the energy.
"""
from __future__ import annotations

import logging

import numpy as np

from ..core.restraint_terms import Restraints, bucket_length, pad_rows
from ..errors import InputError
from ..restraints.nonbonded import NonbondedList

log = logging.getLogger(__name__)

# REFMAC5 (VDWR INCR keywords) as used by servalcat: H-bond donor-acceptor pairs get d_min
# reduced by this (Å; Murshudov et al. 2011); the 1-4 increments are per atom (io/topology.py).
DINC_HBOND = -0.3
NEIGHBOUR_HEADROOM = 1.5  # capacity of the padded list over the pairs found at the start: atoms move during
NEIGHBOUR_SPARE = 64  # refinement and new contacts appear; a fixed capacity keeps one compiled energy
NONBONDED_SLACK = 1.0  # Å; pairs up to d_min + slack are listed so atoms may move between rebuilds
# The capacity is at least this many pairs per atom (proteins have ~6-7 within d_min + slack), rounded up to a
# size bucket: the deposited and shaken models of one structure, or a rerun from the refined model, then get
# the same capacity and share compiled code, where 1.5 x the pairs of each differed by a few percent.
PAIRS_PER_ATOM = 12


def _bond_graph_keys(restraints: Restraints, n: int):
    """Sorted int64 keys p·n + q (p < q) of (1-2 and 1-3 pairs, 1-4 pairs) from the bond and angle lists.

    1-3 pairs are the angle ends and every two neighbours of one atom (links without angle restraints);
    1-4 pairs are the ends of walks c–i–j–d of three bonds that are not themselves 1-2 or 1-3 pairs.
    Sparse matrix products (scipy comes with jax): the walk in Python took ~0.4 s on 4iid's 14.8k atoms."""
    from scipy import sparse

    b = np.asarray(restraints.bond.idx)[np.asarray(restraints.bond.mask) > 0].astype(np.int64).reshape(-1, 2)
    a = np.asarray(restraints.angle.idx)[np.asarray(restraints.angle.mask) > 0].astype(np.int64).reshape(-1, 3)
    adj = sparse.coo_matrix((np.ones(2 * len(b), np.int64), (np.r_[b[:, 0], b[:, 1]], np.r_[b[:, 1], b[:, 0]])),
                            shape=(n, n)).tocsr()
    adj.data[:] = 1  # a bond listed twice is one bond
    two = adj @ adj
    three = two @ adj

    def keys(p, q):
        p, q = np.minimum(p, q), np.maximum(p, q)
        k = p[p != q] * n + q[p != q]
        return np.unique(k)

    t2, t3 = two.tocoo(), three.tocoo()
    excl = np.unique(np.concatenate([keys(b[:, 0], b[:, 1]), keys(a[:, 0], a[:, 2]), keys(t2.row.astype(np.int64), t2.col.astype(np.int64))]))
    one4 = keys(t3.row.astype(np.int64), t3.col.astype(np.int64))
    return excl, np.setdiff1d(one4, excl)


_KEYS_CACHE: list = []  # [(the restraint arrays the keys came from, n, keys)]: the last restraints seen


def _pair_keys(restraints: Restraints, n: int):
    """Sorted int64 keys p·n + q (p < q) of the 1-2 / 1-3 pairs and of the 1-4 pairs (:func:`_bond_graph_keys`).

    The list is rebuilt every macrocycle for the same restraints: the keys of the last restraints are kept
    (the graph walk took ~0.2 s of each rebuild on 4iid's 14.8k atoms when it was Python)."""
    arrays = (restraints.bond.idx, restraints.bond.mask, restraints.angle.idx, restraints.angle.mask)
    for cached, n_cached, keys in _KEYS_CACHE:
        if n_cached == n and all(a is b for a, b in zip(cached, arrays)):
            return keys
    keys = _bond_graph_keys(restraints, n)
    _KEYS_CACHE[:] = [(arrays, n, keys)]
    return keys


def _symmetry_candidates(xyz_cart, crystal, cutoff):
    """Symmetry/lattice images of all atoms that can come within ``cutoff`` of the model.

    Returns (j, op, shift_frac, xyz_cart_of_image) for every candidate image."""
    frac, orth = np.asarray(crystal.frac), np.asarray(crystal.orth)
    xf = xyz_cart @ frac.T
    margin = cutoff * np.linalg.norm(frac, axis=1)  # fractional extent of a cutoff sphere
    lo, hi = xf.min(0) - margin, xf.max(0) + margin
    js, ops, shifts, pos = [], [], [], []
    for k, (r, t) in enumerate(zip(np.asarray(crystal.rot, float), np.asarray(crystal.trans, float))):
        m = xf @ r.T + t
        rng = [np.arange(np.floor(lo[a] - m[:, a].max()), np.ceil(hi[a] - m[:, a].min()) + 1) for a in range(3)]
        # inside the box along each axis for each shift along it (the box test is separable): per shift of the
        # lattice two logical ands, not a test of every (atom, axis) (4iid: 0.08 -> 0.02 s a build)
        along = [{float(v): (m[:, a] + v >= lo[a]) & (m[:, a] + v <= hi[a]) for v in rng[a]} for a in range(3)]
        for s in np.stack(np.meshgrid(*rng, indexing="ij"), -1).reshape(-1, 3):
            inside = along[0][float(s[0])] & along[1][float(s[1])] & along[2][float(s[2])]
            if inside.any():
                sel = np.nonzero(inside)[0]
                js.append(sel)
                ops.append(np.full(sel.size, k))
                shifts.append(np.broadcast_to(t + s, (sel.size, 3)))
                pos.append((m[sel] + s) @ orth.T)
    return np.concatenate(js), np.concatenate(ops), np.concatenate(shifts), np.concatenate(pos)


def switched_off_waters(model, occ) -> np.ndarray:
    """(n,) bool: the waters of ``model`` whose occupancy ``occ`` (n,) is 0: removed by the water check, or spare
    slots not yet filled by water picking.  They carry no density and are left out of the non-bonded list (a
    removed water that clashed pushed its neighbours away; a slot sits anywhere)."""
    return (np.asarray(model.kind) == "water") & (np.asarray(occ) <= 0)


def build_nonbonded(model_or_xyz, restraints: Restraints, crystal=None, cutoff: float | None = None, max_pairs: int | None = None, slack: float = NONBONDED_SLACK,
                    off=None):
    """Padded list of non-bonded pairs that are (nearly) in contact, symmetry mates included.

    Pairs related by a bond or an angle (1-2, 1-3) and pairs of different alternative
    conformations are excluded; 1-4 pairs and H-bond donor/acceptor pairs get a reduced d_min.
    Outside jit; call it again between macrocycles with the same ``max_pairs`` to keep shapes.

    Args:
        model_or_xyz: a Model, or (n, 3) Cartesian coordinates (Å) (then ``crystal`` is required).
        restraints: from :func:`build_restraints` (radii, altlocs, bonded pairs).
        crystal: :class:`jaxrefine.core.crystal.Crystal`; default the model's.
        cutoff: search radius (Å); default the largest possible d_min + ``slack``.
        max_pairs: padded capacity; default NEIGHBOUR_HEADROOM × the pairs found now + NEIGHBOUR_SPARE, at least
            PAIRS_PER_ATOM per atom, rounded up to a size bucket.  If more pairs are
            found the most distant are dropped with a warning.
        slack: list pairs with d < d_min + slack.
        off: (n,) bool atoms left out (:func:`switched_off_waters`); default: the model's waters of occupancy 0, or none
            for bare coordinates.

    Returns:
        :class:`jaxrefine.restraints.nonbonded.NonbondedList`.
    """
    from scipy.spatial import cKDTree

    if hasattr(model_or_xyz, "xyz_cart"):
        crystal = crystal if crystal is not None else model_or_xyz.crystal
        xyz = np.asarray(model_or_xyz.xyz_cart, float)
    else:
        xyz = np.asarray(model_or_xyz, float)
    if crystal is None:
        raise InputError("build_nonbonded: coordinates given without a crystal (cell and symmetry)")
    radius = np.asarray(restraints.vdw_radius, float)
    cutoff = float(2 * radius.max() + slack) if cutoff is None else float(cutoff)
    js, ops, shifts, pos = _symmetry_candidates(xyz, crystal, cutoff)
    pairs = cKDTree(xyz).sparse_distance_matrix(cKDTree(pos), cutoff, output_type="ndarray")
    i, c, d = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"]
    j, op, shift = js[c], ops[c], shifts[c]
    rot = np.asarray(crystal.rot, float)
    ident = np.array([np.allclose(r, np.eye(3)) for r in rot])[op] & np.all(np.abs(shift) < 1e-9, axis=1)
    keep = np.where(ident, i < j, True) & ~((i == j) & (d < 0.5))  # once per pair; not special-position self images
    if off is None and hasattr(model_or_xyz, "occ"):
        off = switched_off_waters(model_or_xyz, model_or_xyz.occ)
    if off is not None and np.any(off):
        keep &= ~(np.asarray(off, bool)[i] | np.asarray(off, bool)[j])
    alt = np.asarray(restraints.altloc)
    keep &= ~((alt[i] != 0) & (alt[j] != 0) & (alt[i] != alt[j]))
    n = xyz.shape[0]
    key = np.minimum(i, j) * n + np.maximum(i, j)
    excl_keys, one4_keys = _pair_keys(restraints, n)
    keep &= ~(ident & np.isin(key, excl_keys))
    d_min = radius[i] + radius[j]
    is14 = ident & np.isin(key, one4_keys)
    dinc = np.asarray(restraints.dinc14, float)
    hb = np.asarray(restraints.hb_type)
    donor_acc = (((hb[i] & 1) & (hb[j] >> 1)) | ((hb[j] & 1) & (hb[i] >> 1))) > 0
    d_min = d_min + np.where(is14, dinc[i] + dinc[j], np.where(donor_acc, DINC_HBOND, 0.0))
    kind = np.where(is14, 1, np.where(donor_acc, 2, 0))
    keep &= d < d_min + slack
    i, j, op, shift, d, d_min, ident, kind = (x[keep] for x in (i, j, op, shift, d, d_min, ident, kind))
    order = np.argsort(d - d_min, kind="stable")  # most violating first
    cap = (bucket_length(max(int(NEIGHBOUR_HEADROOM * order.size) + NEIGHBOUR_SPARE, PAIRS_PER_ATOM * xyz.shape[0]))
           if max_pairs is None else int(max_pairs))
    if order.size > cap:
        log.warning("non-bonded list: %d pairs found, capacity %d; the %d most distant are dropped", order.size, cap, order.size - cap)
        order = order[:cap]
    weight = np.where(ident[order], 1.0, 0.5)
    return NonbondedList(
        i=pad_rows(i[order].astype(np.int32), cap),
        j=pad_rows(j[order].astype(np.int32), cap),
        op=pad_rows(op[order].astype(np.int32), cap),
        shift=pad_rows(shift[order], cap, 0.0),
        d_min=pad_rows(d_min[order], cap, 0.0),
        weight=pad_rows(weight, cap, 0.0),
        kind=pad_rows(kind[order].astype(np.int32), cap),
        rot=rot,
        orth=np.asarray(crystal.orth, float),
        frac=np.asarray(crystal.frac, float),
    )
