"""Restraint containers: padded numpy arrays with masks, pytrees for JAX.

Every term family is a ``NamedTuple`` of arrays padded to a fixed length with a ``mask``
(1.0 for a real restraint, 0.0 for padding), so a problem compiles once.  Padding rows point
at atom 0 with ``sigma = 1`` and contribute exactly zero.

Convention for every harmonic term: ``E = Σ w · mask · ((x − ideal) / σ)²`` (REFMAC5 geometry
target; Murshudov et al. 2011, Acta Cryst. D67, 355, eq. 6).  Angles are in radians inside.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

PAD_QUANTUM = 64  # restraint arrays are padded to a multiple of this (few distinct shapes)


class BondTerm(NamedTuple):
    """idx (nb, 2) int; ideal (nb,) Å; sigma (nb,) Å; mask (nb,)."""

    idx: np.ndarray
    ideal: np.ndarray
    sigma: np.ndarray
    mask: np.ndarray


class AngleTerm(NamedTuple):
    """idx (na, 3) int (middle atom is idx[:, 1]); ideal, sigma (na,) radians; mask (na,)."""

    idx: np.ndarray
    ideal: np.ndarray
    sigma: np.ndarray
    mask: np.ndarray


class TorsionTerm(NamedTuple):
    """idx (nt, 4) int; ideal, sigma (nt,) radians; period (nt,) int (≥ 1); mask (nt,)."""

    idx: np.ndarray
    ideal: np.ndarray
    sigma: np.ndarray
    period: np.ndarray
    mask: np.ndarray


class PlaneTerm(NamedTuple):
    """idx (np, max_atoms) int; atom_mask (np, max_atoms); sigma (np,) Å; mask (np,)."""

    idx: np.ndarray
    atom_mask: np.ndarray
    sigma: np.ndarray
    mask: np.ndarray


class ChiralTerm(NamedTuple):
    """idx (nc, 4) int (centre first); ideal (nc,) |volume| Å³; sigma (nc,) Å³;
    sign (nc,) +1 positive, −1 negative, 0 either ("both"); mask (nc,)."""

    idx: np.ndarray
    ideal: np.ndarray
    sigma: np.ndarray
    sign: np.ndarray
    mask: np.ndarray


class AdpTerm(NamedTuple):
    """idx (nadp, 2) int atom pairs (1-2 and 1-3 neighbours); sigma (nadp,) Å²; mask (nadp,)."""

    idx: np.ndarray
    sigma: np.ndarray
    mask: np.ndarray


class Restraints(NamedTuple):
    """All stereochemical restraints of one model, as padded arrays (a pytree).

    Attributes:
        bond, angle, torsion, plane, chiral, adp: the term families above.
        vdw_radius: (n_atoms,) van der Waals radius per atom (Å) for non-bonded repulsion.
        hb_type: (n_atoms,) int, 0 neither, 1 donor, 2 acceptor, 3 both (ener_lib hb_type).
        altloc: (n_atoms,) int, 0 for no altloc, else ord(letter).
        dinc14: (n_atoms,) d_min increment (Å, ≤ 0) of this atom in a 1-4 pair.
    """

    bond: BondTerm
    angle: AngleTerm
    torsion: TorsionTerm
    plane: PlaneTerm
    chiral: ChiralTerm
    adp: AdpTerm
    vdw_radius: np.ndarray
    hb_type: np.ndarray
    altloc: np.ndarray
    dinc14: np.ndarray

    @property
    def n_atoms(self) -> int:
        return int(self.vdw_radius.shape[0])

    def counts(self) -> dict:
        """Numbers of real (unpadded) restraints per type."""
        return {
            name: int(np.asarray(getattr(self, name).mask).sum())
            for name in ("bond", "angle", "torsion", "plane", "chiral", "adp")
        }


class GeometryWeights(NamedTuple):
    """Per-term weights (scalars, arrays so that changing them does not recompile; 0 = off)."""

    bond: float = 1.0
    angle: float = 1.0
    torsion: float = 1.0
    plane: float = 1.0
    chiral: float = 1.0
    nonbonded: float = 1.0
    adp: float = 1.0

    @classmethod
    def make(cls, **weights) -> "GeometryWeights":
        """Weights as float arrays; unspecified terms default to 1."""
        return cls(**{k: np.asarray(weights.get(k, 1.0), dtype=float) for k in cls._fields})


def padded_length(n: int, quantum: int = PAD_QUANTUM) -> int:
    """Smallest multiple of ``quantum`` ≥ max(n, 1)."""
    return max(1, -(-max(n, 1) // quantum)) * quantum


def bucket_length(n: int, steps_per_octave: int = 4, quantum: int = PAD_QUANTUM) -> int:
    """``n`` rounded up to a coarse geometric grid (``steps_per_octave`` sizes per doubling, at most ~19%
    over ``n`` with 4), then to a multiple of ``quantum``: problems of similar size get equal shapes and
    share compiled code (JAX's cache keys on shapes)."""
    n = max(int(n), 1)
    k = math.ceil(math.log2(n) * steps_per_octave - 1e-9)
    return padded_length(math.ceil(2.0 ** (k / steps_per_octave) - 1e-9), quantum)


def pad_edge_rows(a, length: int) -> np.ndarray:
    """A numpy array padded along axis 0 to ``length`` rows with copies of its last row (finite values where a mask
    leaves the pads out: a masked term is still evaluated, and a NaN there reaches the gradient)."""
    a = np.asarray(a)
    if a.shape[0] >= length:
        return a
    return np.concatenate([a, np.repeat(a[-1:], length - a.shape[0], axis=0)])


def pad_rows(a, length: int, fill=0):
    """Pad a numpy array along axis 0 to ``length`` rows with ``fill``."""
    a = np.asarray(a)
    out = np.full((length,) + a.shape[1:], fill, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out
