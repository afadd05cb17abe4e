"""Local non-crystallographic symmetry (NCS) restraints between copies of the same chain.

For two copies with matched atoms (a_k in copy 1 ↔ a'_k in copy 2), every pair of matched atoms
(a, b) closer than a radius in either copy is a restraint on the difference of the two
distances, Δ = |x_a − x_b| − |x_a' − x_b'|.  Local distances are invariant to any rigid motion
of either copy, so a hinge between domains costs nothing beyond the few pairs that span it, and
no global superposition is needed (REFMAC5 local NCS restraints; Murshudov et al. 2011, Acta
Cryst. D67, 355, §2.6).

The restraint is robust: with z = Δ/σ,
    ρ(z) = z² / (1 + z²/c²)        (Geman & McClure 1987, Bull. Int. Statist. Inst. 52, 5)
which is z² for small differences and saturates at c² for large ones, so a real difference
between the copies (a different side-chain rotamer, a crystal contact) stops pulling.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from ..core.device import array_module
from ..core.restraint_terms import bucket_length, pad_rows

NCS_RADIUS = 4.5  # Å, pairs of atoms closer than this in either copy are restrained
NCS_SIGMA = 0.1  # Å, σ of the distance difference (REFMAC-like local NCS restraints)
NCS_SATURATION = 3.0  # c: beyond |Δ| ≈ c·σ = 0.3 Å a difference is treated as real and left free
# The list's capacity is at least this many restraints per matched atom (1va7: 8.9 from its shaken start, 7.7 from
# the refined model), rounded up to a size bucket, so that a rerun from a refined model gets the same shape and
# loads the programs compiled for the first run (the pair count follows the coordinates: 25 408 against 22 016).
NCS_PAIRS_PER_ATOM = 10


class NcsTerm(NamedTuple):
    """Padded local NCS restraints.

    Attributes:
        idx: (n, 4) int atoms (a, b) of copy 1 then (a', b') of copy 2.
        sigma: (n,) Å.
        mask: (n,) 1.0 real, 0.0 padding.
        copy_pair: (n,) int index of the pair of copies each restraint belongs to (for reports).
        saturation: scalar c of the robust function (an array, so changing it does not recompile).
    """

    idx: np.ndarray
    sigma: np.ndarray
    mask: np.ndarray
    copy_pair: np.ndarray
    saturation: np.ndarray


def local_pairs(xyz_cart, atoms1, atoms2, radius=NCS_RADIUS):
    """(k, 4) int atoms (a, b, a', b') of matched pairs closer than ``radius`` in either copy, ordered by (a, b)
    positions in ``atoms1``.

    Args:
        xyz_cart: (n_atoms, 3) Å.
        atoms1, atoms2: (m,) int matched atoms of copy 1 and copy 2 (atoms1[k] ↔ atoms2[k]).
        radius: Å.
    """
    from scipy.spatial import cKDTree  # scipy comes with jax

    a1 = np.asarray(atoms1, np.int64)
    a2 = np.asarray(atoms2, np.int64)
    x1, x2 = np.asarray(xyz_cart, float)[a1], np.asarray(xyz_cart, float)[a2]
    r2 = radius * radius
    found = [np.zeros((0, 2), np.int64)]
    for x in (x1, x2):  # k-d tree pairs within the radius (4iid's two copies: 0.24 s, where an m × m test took 1.0 s)
        ij = cKDTree(x).query_pairs(radius, output_type="ndarray").astype(np.int64)
        d = x[ij[:, 0]] - x[ij[:, 1]]
        found.append(ij[np.einsum("ij,ij->i", d, d) < r2])
    ij = np.unique(np.sort(np.concatenate(found), axis=1), axis=0)  # each unordered pair once, sorted by (i, j)
    i, j = ij[:, 0], ij[:, 1]
    return np.stack([a1[i], a1[j], a2[i], a2[j]], -1)


def ncs_term(xyz_cart, copies, radius=NCS_RADIUS, sigma=NCS_SIGMA, saturation=NCS_SATURATION) -> NcsTerm:
    """Build the padded term (numpy) for every pair of copies.

    Args:
        xyz_cart: (n_atoms, 3) starting coordinates (Å); they choose which pairs are local.
        copies: sequence of (atoms1, atoms2) matched index arrays, one per pair of copies
            (e.g. from :func:`jaxrefine.io.ncs.find_ncs_copies`).
        radius, sigma, saturation: see the module constants.
    """
    blocks = [local_pairs(xyz_cart, a1, a2, radius) for a1, a2 in copies]
    idx = np.concatenate(blocks) if blocks else np.zeros((0, 4), np.int64)
    which = np.concatenate([np.full(len(b), k) for k, b in enumerate(blocks)]) if blocks else np.zeros(0)
    n = bucket_length(max(len(idx), NCS_PAIRS_PER_ATOM * sum(len(a1) for a1, _ in copies)))
    return NcsTerm(
        idx=pad_rows(idx.astype(np.int32), n),
        sigma=pad_rows(np.full(len(idx), float(sigma)), n, 1.0),
        mask=pad_rows(np.ones(len(idx)), n),
        copy_pair=pad_rows(which.astype(np.int32), n, -1),
        saturation=np.asarray(float(saturation)),
    )


def ncs_deltas(xyz_cart, term: NcsTerm):
    """(n,) distance differences Δ = d(copy 1) − d(copy 2) (Å); xyz_cart (n_atoms, 3) Å (numpy coordinates and
    term: numpy, for reports; else JAX)."""
    xp = array_module(xyz_cart, term)
    pad = 1.0 - term.mask  # padding rows point at atom 0 twice: keep sqrt away from 0

    def dist(a, b):
        d = xyz_cart[term.idx[:, a]] - xyz_cart[term.idx[:, b]]
        return xp.sqrt(xp.sum(d * d, -1) + pad)

    return dist(0, 1) - dist(2, 3)


def geman_mcclure(z, c):
    """ρ(z) = z²/(1 + z²/c²): ≈ z² near 0, → c² for |z| ≫ c."""
    z2 = z * z
    return z2 / (1.0 + z2 / (c * c))


def ncs_energy(xyz_cart, term: NcsTerm):
    """Σ mask ρ(Δ/σ) over the local NCS pairs (dimensionless)."""
    z = ncs_deltas(xyz_cart, term) / term.sigma
    return jnp.sum(term.mask * geman_mcclure(z, term.saturation))


def ncs_report(xyz_cart, term: NcsTerm, names) -> list:
    """Per pair of copies: restraint count and RMS / largest |Δ| (Å), as plain dicts.

    Args:
        names: one label per pair of copies, e.g. ("A-B", "A-C").
    """
    delta = ncs_deltas(np.asarray(xyz_cart, float), NcsTerm(*(np.asarray(v) for v in term)))  # numpy: no programs
    m = np.asarray(term.mask) > 0
    which = np.asarray(term.copy_pair)
    out = []
    for k, name in enumerate(names):
        d = delta[m & (which == k)]
        out.append({
            "copies": name, "n_pairs": int(d.size),
            "rms_delta": float(np.sqrt(np.mean(d * d))) if d.size else 0.0,
            "max_delta": float(np.max(np.abs(d))) if d.size else 0.0,
        })
    return out
