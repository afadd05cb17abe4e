"""Non-bonded (van der Waals) repulsion, symmetry mates included.

For each listed pair (i, j') with j' = orth·(R_op·frac·x_j + t), the energy is
E = Σ w_pair · max(d_min − d, 0)² / σ²  with σ = 0.2 Å, the one-sided harmonic repulsion of
REFMAC5/servalcat (Murshudov et al. 2011, Acta Cryst. D67, 355, sect. 2.4).  d_min is the sum of
the atoms' van der Waals radii (CCP4 ener_lib), reduced for 1-4 pairs and H-bond donor/acceptor
pairs (see :mod:`jaxrefine.io.topology`).  A pair inside the asymmetric unit has w_pair = 1; a
contact with a symmetry mate is listed from both sides and gets w_pair = 1/2.
The pair list is built outside jit (:func:`jaxrefine.problem.neighbours.build_nonbonded`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from ..core.device import array_module

NONBONDED_SIGMA = 0.2  # Å, REFMAC5/servalcat default esd of the vdW repulsion


class NonbondedList(NamedTuple):
    """Padded pair list (a pytree).

    Attributes:
        i, j: (P,) int atom indices (j is moved by the symmetry operator).
        op: (P,) int index into ``rot``.
        shift: (P, 3) fractional translation of the mate: t_op + lattice shift.
        d_min: (P,) minimum allowed distance (Å).
        weight: (P,) 1 inside the asymmetric unit, 1/2 for symmetry contacts, 0 for padding.
        kind: (P,) int, 0 plain vdW pair, 1 1-4 pair, 2 H-bond donor-acceptor pair.
        rot: (n_ops, 3, 3) fractional rotation matrices (op 0 need not be the identity).
        orth, frac: (3, 3) fractional -> Cartesian and back.
    """

    i: np.ndarray
    j: np.ndarray
    op: np.ndarray
    shift: np.ndarray
    d_min: np.ndarray
    weight: np.ndarray
    kind: np.ndarray
    rot: np.ndarray
    orth: np.ndarray
    frac: np.ndarray

    @property
    def capacity(self) -> int:
        return int(self.i.shape[0])

    @property
    def n_pairs(self) -> int:
        return int(np.count_nonzero(np.asarray(self.weight)))


def pair_distances(xyz_cart, nb: NonbondedList, orth=None, frac=None):
    """(P,) distances (Å) between atom i and the symmetry mate of atom j."""
    orth = nb.orth if orth is None else orth
    frac = nb.frac if frac is None else frac
    # rotate all atoms once per operator, then gather one image per pair (cheaper than per-pair matrices)
    xp = array_module(xyz_cart, orth, frac, *nb)
    rot_cart = xp.einsum("ij,ojk,kl->oil", orth, nb.rot, frac)  # (n_ops, 3, 3)
    images = xp.einsum("oij,nj->oni", rot_cart, xyz_cart)  # (n_ops, n, 3)
    diff = xyz_cart[nb.i] - images[nb.op, nb.j] - nb.shift @ orth.T
    pad = (nb.weight == 0).astype(diff.dtype)
    return xp.sqrt(xp.sum(diff * diff, axis=-1) + pad)  # padding: d = 1, gradient finite


def nonbonded_energy(xyz_cart, nb: NonbondedList, orth=None, frac=None):
    """Σ w_pair max(d_min − d, 0)²/σ² (see module docstring)."""
    d = pair_distances(xyz_cart, nb, orth, frac)
    viol = jnp.maximum(nb.d_min - d, 0.0) / NONBONDED_SIGMA
    return jnp.sum(nb.weight * viol * viol)
