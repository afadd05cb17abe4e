"""Unit cell, space-group operators, Miller indices and resolution bins as plain arrays.

No gemmi objects live here: :mod:`jaxrefine.io` reads cells and space groups through gemmi and
hands over a :class:`Crystal` of numpy arrays.

Conventions (International Tables for Crystallography Vol. B, ch. 1.1):
fractional coordinates ``x_frac = frac @ x_cart``, ``x_cart = orth @ x_frac`` (PDB convention:
a along x, c* along z). For a reflection ``h`` (row of ints) the reciprocal vector in Cartesian
coordinates is ``s = frac.T @ h`` and ``1/d^2 = |s|^2 = h^T G* h`` with ``G* = frac @ frac.T``.
A symmetry operator maps ``x' = R x + t`` on fractional coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True, eq=False)
class Crystal:
    """Cell and symmetry, as arrays.

    Attributes:
        cell: (6,) a, b, c (Å), alpha, beta, gamma (degrees).
        space_group: Hermann–Mauguin symbol, e.g. ``"P 21 21 21"``.
        sg_number: International Tables number.
        rot: (n_ops, 3, 3) float, rotation parts of all operators, centring included.
        trans: (n_ops, 3) float, fractional translations of all operators, in [0, 1).
        n_primitive_ops: number of operators without centring (``n_ops / n_centrings``).
        orth: (3, 3) fractional -> Cartesian (Å).
        frac: (3, 3) Cartesian (Å) -> fractional.
    """

    cell: np.ndarray
    space_group: str
    sg_number: int
    rot: np.ndarray
    trans: np.ndarray
    n_primitive_ops: int
    orth: np.ndarray = field(repr=False)
    frac: np.ndarray = field(repr=False)

    @property
    def n_ops(self) -> int:
        return int(self.rot.shape[0])

    @property
    def volume(self) -> float:
        """Cell volume (Å^3)."""
        return float(abs(np.linalg.det(self.orth)))

    @property
    def recip_metric(self) -> np.ndarray:
        """(3, 3) reciprocal metric tensor G* (Å^-2)."""
        return self.frac @ self.frac.T

    @property
    def is_centrosymmetric(self) -> bool:
        return bool(np.any(np.all(np.isclose(self.rot, -np.eye(3)), axis=(1, 2))))

    def to_cart(self, xyz_frac: np.ndarray) -> np.ndarray:
        """(n, 3) fractional -> (n, 3) Cartesian Å."""
        return np.asarray(xyz_frac) @ self.orth.T

    def to_frac(self, xyz_cart: np.ndarray) -> np.ndarray:
        """(n, 3) Cartesian Å -> (n, 3) fractional."""
        return np.asarray(xyz_cart) @ self.frac.T


def orth_matrix(cell) -> np.ndarray:
    """Orthogonalisation matrix for a cell (a, b, c, alpha, beta, gamma), PDB convention.

    Reference: International Tables Vol. B, 2nd ed., eq. 3.3.1.11 (a along x, c* along z).
    """
    a, b, c = (float(v) for v in cell[:3])
    al, be, ga = np.radians(np.asarray(cell[3:6], dtype=float))
    ca, cb, cg = np.cos(al), np.cos(be), np.cos(ga)
    sg = np.sin(ga)
    v = np.sqrt(1 - ca**2 - cb**2 - cg**2 + 2 * ca * cb * cg)
    return np.array(
        [
            [a, b * cg, c * cb],
            [0.0, b * sg, c * (ca - cb * cg) / sg],
            [0.0, 0.0, c * v / sg],
        ]
    )


def with_cell(crystal: Crystal, cell) -> Crystal:
    """``crystal``'s symmetry in another cell (a, b, c, α, β, γ), its orth and frac matrices made for it."""
    orth = orth_matrix(cell)
    return replace(crystal, cell=np.asarray(cell, float), orth=orth, frac=np.linalg.inv(orth))


def s2_of(hkl: np.ndarray, crystal: Crystal) -> np.ndarray:
    """1/d^2 (Å^-2) for (n, 3) integer hkl."""
    h = np.asarray(hkl, dtype=float)
    return np.einsum("ni,ij,nj->n", h, crystal.recip_metric, h)


def d_spacing(hkl: np.ndarray, crystal: Crystal) -> np.ndarray:
    """Resolution d (Å) of each reflection; (n, 3) int -> (n,)."""
    s2 = s2_of(hkl, crystal)
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(s2)


def resolution_bins(d: np.ndarray, n_bins: int = 10) -> np.ndarray:
    """Equal-count resolution bins, bin 0 at low resolution.

    Args:
        d: (n,) resolution of each reflection (Å).
        n_bins: number of bins (reduced when there are fewer than 2 reflections per bin).

    Returns:
        (n,) int bin index in [0, n_bins).
    """
    d = np.asarray(d)
    n = d.shape[0]
    n_bins = max(1, min(int(n_bins), n // 2 if n >= 2 else 1))
    order = np.argsort(-d, kind="stable")
    bins = np.empty(n, dtype=np.int32)
    bins[order] = (np.arange(n) * n_bins) // max(n, 1)
    return bins


def bin_limits(d: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """(n_bins, 2) d_max, d_min of each bin (Å)."""
    n_bins = int(bins.max()) + 1 if bins.size else 0
    out = np.zeros((n_bins, 2))
    for i in range(n_bins):
        di = d[bins == i]
        out[i] = (di.max(), di.min()) if di.size else (np.nan, np.nan)
    return out


def symmetry_equivalents(hkl: np.ndarray, crystal: Crystal) -> np.ndarray:
    """(n_ops, n, 3) indices h R for each operator (the reflections equivalent to hkl)."""
    h = np.asarray(hkl)
    return np.einsum("nj,oji->oni", h, np.rint(crystal.rot).astype(int))


def centric_flags(hkl: np.ndarray, crystal: Crystal) -> np.ndarray:
    """(n,) bool: reflection is centric (some operator maps h to -h)."""
    eq = symmetry_equivalents(hkl, crystal)
    return np.any(np.all(eq == -np.asarray(hkl)[None], axis=2), axis=0)


def epsilon_factors(hkl: np.ndarray, crystal: Crystal) -> np.ndarray:
    """(n,) int statistical weight epsilon: primitive operators leaving h invariant.

    Reference: International Tables Vol. B, sec. 2.1.3.3 (epsilon counts the point-group
    operators that leave h unchanged; centring does not multiply it).
    """
    eq = symmetry_equivalents(hkl, crystal)
    same = np.all(eq == np.asarray(hkl)[None], axis=2).sum(axis=0)
    n_cen = crystal.n_ops // crystal.n_primitive_ops
    return (same // n_cen).astype(np.int32)


def systematically_absent(hkl: np.ndarray, crystal: Crystal) -> np.ndarray:
    """(n,) bool: h is systematically absent (phase shift of an invariant operator is non-zero)."""
    h = np.asarray(hkl)
    eq = symmetry_equivalents(h, crystal)
    same = np.all(eq == h[None], axis=2)  # (n_ops, n)
    phase = (h @ crystal.trans.T).T  # (n_ops, n)
    off = np.abs(phase - np.rint(phase)) > 1e-6
    return np.any(same & off, axis=0)
