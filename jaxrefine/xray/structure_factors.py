"""Structure factors F_calc(hkl) as pure JAX functions: direct summation and FFT.

F(h) = Σ_j occ_j f0_j(s) T_j(h) Σ_ops exp(2πi h·(R_op x_j + t_op))

(International Tables Vol. B, ch. 1.2, eq. 1.2.7.1), with the Debye–Waller factor
T_j(h) = exp(−2π² hᵀ R U*_j Rᵀ h) of the symmetry copy (Trueblood et al. 1996, Acta Cryst. A52,
770, eq. 5), which is exp(−B s²/4) for an isotropic atom.  All operators of the space group,
centring included, are summed, so F is the structure factor of the whole unit cell.

ADP convention: the total displacement of an atom is U = u_aniso + b_iso/(8π²)·I, with
``u_aniso`` the Cartesian U of PDB ANISOU records (U11 U22 U33 U12 U13 U23, Å²) as held by
``Model.u_aniso``.  For an anisotropic atom pass its U and b_iso = 0 (see :func:`split_adp`);
for an isotropic atom pass U = 0.

Two methods share one entry point, :func:`structure_factors`, configured once by
:func:`make_sf_setup` (numpy work, outside jit):

* ``"direct"``: exact summation, chunked over reflections (the reference);
* ``"fft"``: each atom (as given, no symmetry copies) is spread onto one grid of the whole unit
  cell as its form factor's Gaussians, each widened by B + B_blur (one grid and one FFT however
  many elements); the grid is Fourier transformed and read at Rᵀh for every operator,
  F(h) = Σ_ops exp(2πi h·t) F_asu(Rᵀh) (International Tables B, eq. 1.4.2.14), and divided by
  exp(−B_blur s²/4) (Ten Eyck 1977, Acta Cryst. A33, 486; the blurring trick of Navaza 2002,
  Acta Cryst. A58, 568, as in cctbx and gemmi).  Symmetry thus costs n_ops reads per reflection
  instead of n_ops spreadings per atom.  The gradient is JAX's reverse mode: the transpose of
  the spreading is a gather from the back-transformed weighted difference map (Agarwal 1978,
  Acta Cryst. A34, 791).
"""
from __future__ import annotations

import dataclasses
from functools import partial
import logging
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core.cache import read_table, write_table
from ..core.device import array_module, on_device
from .fft_grid import box_rows, fold_periodic_c, spread_boxes
from .formfactors import FIT_TOL, FormFactors, f0, fit_form_factors

log = logging.getLogger("jaxrefine")

TWO_PI = 2.0 * np.pi
# index pairs of the off-diagonal terms of a 3x3 metric
PAIRS = ((0, 1), (0, 2), (1, 2))
EIGHT_PI2 = 8.0 * np.pi**2
# FFT grid oversampling of F_calc (spacing d_min / (2·rate)); the blur B_blur keeps aliasing at eps whatever the
# rate.  1.25 rather than gemmi's usual 1.5: the grid has ~40 % fewer points and the boxes, counted in grid
# steps, no more; F and gradient 1.6-2.1x faster on 5orl, 1l2h and 4xof (4iid, whose large B needs a large
# blur, about the same), FFT-vs-direct R 2.0e-4 to 4.2e-4 on the seven shared datasets (1.5: 1.5e-4 to
# 2.8e-4; tests allow 1e-3).  Measured 2026-12-02, benchmarks/README.md run l.
SF_GRID_RATE = 1.25


class SymOps(NamedTuple):
    """Space-group operators on fractional coordinates, x' = R x + t.

    Attributes:
        rot: (n_ops, 3, 3) rotation parts (float).
        trans: (n_ops, 3) translations (fractional).
    """

    rot: np.ndarray
    trans: np.ndarray


def symops_of(crystal) -> SymOps:
    """All operators (centring included) of a :class:`jaxrefine.core.crystal.Crystal`."""
    return SymOps(rot=np.asarray(crystal.rot, float), trans=np.asarray(crystal.trans, float))


def split_adp(b_iso, u_aniso, has_aniso):
    """(b_iso, u_aniso) in the convention of :func:`structure_factors` from a model's arrays.

    Args:
        b_iso: (n,) B (Å²); B_eq for anisotropic atoms.
        u_aniso: (n, 6) Cartesian U (Å²), zeros where isotropic.
        has_aniso: (n,) bool.

    Returns:
        (n,) b_iso with 0 where the atom is anisotropic, (n, 6) u_aniso with 0 where isotropic.
    """
    has_aniso = np.asarray(has_aniso, bool)
    return np.where(has_aniso, 0.0, b_iso), np.where(has_aniso[:, None], u_aniso, 0.0)


def _u6_to_mat(u6):
    """(..., 6) U11 U22 U33 U12 U13 U23 -> (..., 3, 3) symmetric (numpy for numpy input)."""
    xp = array_module(u6)
    u11, u22, u33, u12, u13, u23 = (u6[..., i] for i in range(6))
    return xp.stack(
        [xp.stack([u11, u12, u13], -1), xp.stack([u12, u22, u23], -1), xp.stack([u13, u23, u33], -1)], -2
    )


def _inv_det_3x3(m):
    """Inverse and determinant of (..., 3, 3) matrices by the adjugate (cheaper than LAPACK calls
    on many tiny matrices)."""
    c = [[None] * 3 for _ in range(3)]
    for i in range(3):
        for j in range(3):
            i1, i2 = (i + 1) % 3, (i + 2) % 3
            j1, j2 = (j + 1) % 3, (j + 2) % 3
            c[i][j] = m[..., i1, j1] * m[..., i2, j2] - m[..., i1, j2] * m[..., i2, j1]  # cofactor
    det = m[..., 0, 0] * c[0][0] + m[..., 0, 1] * c[0][1] + m[..., 0, 2] * c[0][2]
    adj = jnp.stack([jnp.stack([c[j][i] for j in range(3)], -1) for i in range(3)], -2)
    return adj / det[..., None, None], det


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SFMeta:
    """Static (hashable) part of :class:`SFSetup`: changing it recompiles.

    Attributes:
        method: "fft" or "direct".
        n_refl: number of reflections.
        chunk: reflections per chunk of the direct sum.
        grid_shape: (3,) FFT grid points along a, b, c (fft only).
        box: per class of atoms, (3,) spreading box points along a, b, c (fft only).
        rows: per class, the (x, y) rows of the box that are spread (corners cut).
        cross_terms: index pairs (a, b) of grid axes whose metric couples (oblique cells).
        constant: the form factors' constant term is spread (as a Gaussian of width 0); False with
            refitted form factors (:func:`jaxrefine.xray.formfactors.fit_form_factors`, c = 0).
        iso_classes: the classes spread as isotropic atoms even when U is given (atoms whose U is always
            zero, e.g. riding hydrogens: ``make_sf_setup(iso_atoms=...)``).
    """

    method: str
    n_refl: int
    chunk: int = 256
    grid_shape: tuple = ()
    box: tuple = ()
    rows: tuple = ()
    cross_terms: tuple = ()
    constant: bool = True
    iso_classes: tuple = ()


class SFSetup(NamedTuple):
    """Everything :func:`structure_factors` needs besides the atom parameters (a pytree).

    The arrays are leaves (pass the setup as a jit argument; new values of the same shapes do
    not recompile); ``meta`` is static aux data.

    Attributes:
        hkl: (n_refl, 3) int32 Miller indices.
        s2: (n_refl,) 1/d² (Å⁻²).
        rot: (n_ops, 3, 3) rotation parts of the operators (fractional).
        trans: (n_ops, 3) translations (fractional).
        ff: form factors (a, b, c per type; type_index per atom).
        orth: (3, 3) fractional -> Cartesian (Å).
        frac: (3, 3) Cartesian -> fractional (Å⁻¹).
        b_blur: () blurring B added to every atom on the grid (Å²), fft only.
        grid_metric: (3, 3) Gᵍ = Dᵀ G D, squared distances in grid steps -> Å² (D = diag(1/N)).
        sample_index: (n_ops, n_refl, 3) int32 index of Rᵀh (or −Rᵀh) into the half-complex FFT
            array of the asymmetric-unit density, per operator (fft).
        sample_conj: (n_ops, n_refl) bool, take the complex conjugate (index is of +Rᵀh).
        sample_phase: (n_ops, n_refl) complex exp(2πi h·t) of each operator (fft).
        volume: () cell volume (Å³).
        box_atoms: per box class, (n_c,) int32 indices of its atoms (fft).
        meta: static metadata.
    """

    hkl: jnp.ndarray
    s2: jnp.ndarray
    rot: jnp.ndarray
    trans: jnp.ndarray
    ff: FormFactors
    orth: jnp.ndarray
    frac: jnp.ndarray
    b_blur: jnp.ndarray
    grid_metric: jnp.ndarray
    sample_index: jnp.ndarray
    sample_conj: jnp.ndarray
    sample_phase: jnp.ndarray
    volume: jnp.ndarray
    box_atoms: tuple
    meta: SFMeta


# ----------------------------------------------------------------------------------- setup


def _smooth_size(n: int, factors=(2, 3, 5)) -> int:
    """Smallest even integer >= n whose prime factors are all in ``factors`` (fast FFT sizes)."""
    n = max(int(n), 2)
    while True:
        if n % 2 == 0:
            m = n
            for p in factors:
                while m % p == 0:
                    m //= p
            if m == 1:
                return n
        n += 1


def fft_grid_shape(crystal, d_min: float, rate: float = 1.5, hkl=None) -> tuple:
    """Grid points along a, b, c for a spacing of about d_min / (2·rate).

    Each size is even, 2,3,5-smooth (fast FFT), and above 2·|h|max so that every requested
    reflection has its own FFT coefficient (Ten Eyck 1977, Acta Cryst. A33, 486).

    Args:
        crystal: cell.
        d_min: resolution limit (Å).
        rate: oversampling; 1 is Nyquist for d_min.
        hkl: (n, 3) reflections that must fit (optional).
    """
    lengths = np.linalg.norm(np.asarray(crystal.orth), axis=0)  # |a|, |b|, |c| (Å)
    need = np.ceil(2.0 * rate * lengths / d_min)
    if hkl is not None and len(hkl):
        need = np.maximum(need, 2 * np.abs(np.asarray(hkl)).max(axis=0) + 2)
    return tuple(_smooth_size(int(v)) for v in need)


def grid_resolution(d_min: float, steps_per_octave: int = 0) -> float:
    """The resolution (Å) an FFT grid, its blur and the form-factor fit are made for: ``d_min`` rounded down to one
    of ``steps_per_octave`` values per octave (2^(k / steps) Å), so that datasets of nearby resolution get the same
    grid and boxes and share compiled programs (``runtime.grid_steps``); ``d_min`` itself for 0.  The grid is then
    up to 2^(3 / steps) times finer than ``d_min`` needs (F as accurate or more)."""
    if steps_per_octave <= 0:
        return float(d_min)
    k = math.floor(math.log2(float(d_min)) * steps_per_octave + 1e-9)
    return float(2.0 ** (k / steps_per_octave))


def _sample_indices(hkl, grid_shape):
    """Index of each reflection into an rfftn array of grid_shape, and whether to conjugate.

    F(h) = Σ ρ exp(+2πi h·x) = FFT[−h] (numpy's forward transform uses exp(−2πi...)); the
    half-complex array stores l >= 0 only, so for l > 0 we read FFT[h] and conjugate.
    """
    hkl = np.asarray(hkl, np.int64)
    conj = hkl[:, 2] > 0
    idx = np.where(conj[:, None], hkl, -hkl)
    idx = idx % np.asarray(grid_shape)[None]
    return idx.astype(np.int32), conj


def make_sf_setup(
    crystal,
    hkl,
    ff: FormFactors,
    method: str = "fft",
    d_min: float | None = None,
    rate: float = SF_GRID_RATE,
    b_iso=None,
    u_aniso=None,
    b_blur: float | None = None,
    b_margin: float = 5.0,
    n_classes: int = 3,
    eps: float = 1e-2,
    eps_box: float = 1e-3,
    chunk: int | None = None,
    memory_bytes: float = 1.0e9,
    dtype=None,
    fit_tol: float | None = FIT_TOL,
    iso_atoms=None,
    reuse_classes: bool = False,
    class_points: float | None = None,
    layout_cells=(),
) -> SFSetup:
    """Precompute the arrays and static sizes of a structure-factor problem (numpy, outside jit).

    Args:
        crystal: :class:`jaxrefine.core.crystal.Crystal` (cell and all operators).
        hkl: (n_refl, 3) int Miller indices.
        ff: form factors, type_index of length n_atoms.
        method: "fft" (default) or "direct".
        d_min: resolution the grid is made for (Å); default the highest resolution of hkl.
        rate: grid oversampling (spacing ≈ d_min / (2·rate)); see SF_GRID_RATE.
        b_iso: (n_atoms,) B (Å²) of the model; sets the blur and box (fft).
        u_aniso: (n_atoms, 6) Cartesian U (Å²) or None; widens the box for anisotropic atoms.
        b_blur: blurring B (Å²); default: the smallest B_blur making aliasing ≲ eps.
        b_margin: each atom's box holds a Gaussian of B + b_margin (Å²), room for refinement to
            raise B; an atom whose B grows beyond loses accuracy gradually (its Gaussian is cut at
            the box edge).  Make a new setup after large B changes.
        n_classes: atoms are split into up to this many classes by B, each with its own box size,
            so that a few high-B atoms do not set the box of all (the split minimises the
            number of grid points spread).
        eps: target relative weight of the aliased images (fft; sets the blur).
        eps_box: value of an atom's density at the box edge relative to its peak (fft; sets the box).
            With the defaults the error in F is ~2e-4 (Σ||F_fft| − |F_direct|| / Σ|F_direct|,
            tests on the shared datasets).
        chunk: reflections per chunk (direct); default from memory_bytes.
        memory_bytes: memory budget of one chunk of the direct sum.
        dtype: float dtype of the real arrays (default: JAX's default float).
        fit_tol: fft: spread the form factors as the fewest Gaussians that give the model's F to this
            relative error over the reflections' range (:func:`jaxrefine.xray.formfactors.fit_form_factors`:
            two instead of IT92's five terms at 2.9 Å, three at 1.15-2.3 Å for proteins); None: IT92.
        iso_atoms: (n_atoms,) bool, atoms whose ``u_aniso`` is zero throughout (riding hydrogens): with
            ``u_aniso`` they get box classes of their own, spread as isotropic Gaussians (fft; see
            ISO_POINT_COST).
        class_points: fft: box points a further class must save to be made (default CLASS_MIN_POINTS; 0: up to
            ``n_classes`` whenever they save any).
        layout_cells: fft: further cells (a, b, c, α, β, γ) the grid and boxes must also serve: the grid as fine,
            the blur, boxes and rows as large and the metric's cross terms as many as any of them needs (with this
            cell's own), so that crystals of one form with slightly different cells (a screen: ``runtime.cell_range``)
            get one layout and share compiled programs; F of this cell is as accurate or more.
        reuse_classes: fft: keep the box classes an earlier setup of the same atoms on the same grid chose
            (stored beside the compiled programs, see STORED_CLASS_COST) when this model's atoms fit them, so that
            a rerun from a refined model loads the programs compiled for the first run instead of compiling anew.

    Returns:
        :class:`SFSetup`.

    Notes:
        The box classes (which atoms, what box) are static shapes of the fft setup: a setup
        rebuilt from different B values may split the atoms differently and then compiles anew.
        In a refinement, build it from the starting model (b_margin leaves room for B to grow)
        and rebuild only between macrocycles.  B + B_blur must stay positive.
    """
    from ..core.crystal import s2_of, with_cell  # crystal.py is numpy-only

    if method not in ("fft", "direct"):
        raise ValueError(f"method must be 'fft' or 'direct', got {method!r}")
    dtype = dtype or jnp.zeros(()).dtype
    hkl = np.asarray(hkl, np.int32).reshape(-1, 3)
    s2 = s2_of(hkl, crystal)
    n_refl = len(hkl)
    n_atoms = len(ff.type_index)
    n_ops = len(crystal.rot)
    orth = np.asarray(crystal.orth, float)
    frac = np.asarray(crystal.frac, float)
    if d_min is None:
        d_min = float(1.0 / np.sqrt(s2.max())) if n_refl else 2.0
    s2_max = max(1.0 / d_min**2, float(s2.max()) if n_refl else 0.0)
    # on_device: jnp.asarray of host data compiles a one-operation program per shape (core/device.py)
    ff_j = FormFactors(*(on_device(v, dtype) for v in ff[:3]), on_device(ff.type_index, jnp.int32))
    common = dict(
        hkl=on_device(hkl),
        s2=on_device(s2, dtype),
        rot=on_device(crystal.rot, dtype),
        trans=on_device(crystal.trans, dtype),
        ff=ff_j,
        orth=on_device(orth, dtype),
        frac=on_device(frac, dtype),
        volume=on_device(crystal.volume, dtype),
    )
    if method == "direct":
        if chunk is None:
            # ~6 live (ops, chunk, atoms) float arrays per chunk
            chunk = int(np.clip(memory_bytes / (6 * 8 * max(n_ops * n_atoms, 1)), 8, 1024))
        chunk = int(min(chunk, max(n_refl, 1)))
        meta = SFMeta(method="direct", n_refl=n_refl, chunk=chunk)
        zero = jnp.zeros((0, 3), jnp.int32)
        return SFSetup(
            **common,
            b_blur=jnp.asarray(0.0, dtype),
            grid_metric=jnp.zeros((3, 3), dtype),
            sample_index=zero,
            sample_conj=jnp.zeros((0,), bool),
            sample_phase=jnp.zeros((0,), jnp.result_type(dtype, jnp.complex64)),
            box_atoms=(),
            meta=meta,
        )

    constant = True
    if fit_tol is not None and n_atoms:
        fitted, n_terms = fit_form_factors(FormFactors(*(np.asarray(v, float) for v in ff[:3]), np.asarray(ff.type_index)),
                                           s2_max, fit_tol)
        if n_terms:
            ff, constant = fitted, False
            common["ff"] = FormFactors(*(on_device(v, dtype) for v in ff[:3]), on_device(ff.type_index, jnp.int32))
    # F(h) = Σ_ops exp(2πi h·t) F_asu(Rᵀh): the atoms are spread once, without symmetry copies,
    # and the transform is read at the rotated indices (International Tables B, eq. 1.4.2.14)
    rot_int = np.rint(np.asarray(crystal.rot)).astype(np.int64)
    h_rot = np.einsum("ri,oij->orj", hkl.astype(np.int64), rot_int)  # (ops, r, 3) = hR = (Rᵀh)ᵀ
    grid = fft_grid_shape(crystal, d_min, rate, h_rot.reshape(-1, 3))
    others = [with_cell(crystal, c) for c in layout_cells]
    for other in others:  # as fine as each of the layout's cells needs
        grid = tuple(max(g, h) for g, h in zip(grid, fft_grid_shape(other, d_min, rate)))
    fracs = [frac] + [np.asarray(o.frac, float) for o in others]
    n_grid = np.asarray(grid, float)
    if b_iso is None:
        b_iso = np.full(n_atoms, 20.0)
    b_lo, b_hi = _adp_extent(np.asarray(b_iso, float).reshape(n_atoms), u_aniso)
    b_min = float(max(b_lo.min(), 0.0)) if n_atoms else 0.0
    log_eps = -math.log(eps)
    log_eps_box = -math.log(eps_box)
    if b_blur is None:
        # the nearest alias of h lies at |s| >= min_a N_a |a*| − s_max; its weight relative to h is
        # exp(−(B + B_blur)(s_alias² − s_max²)/4) (Ten Eyck 1977), made <= eps for the sharpest atom
        s_alias = min(float(np.min(n_grid * np.linalg.norm(f, axis=1))) for f in fracs) - math.sqrt(s2_max)
        b_needed = 4.0 * log_eps / max(s_alias**2 - s2_max, 1e-6)
        b_blur = max(b_needed - b_min, 0.0)
    # box half-width: the Gaussian of an atom falls to eps of its peak; its variance along grid
    # axis a is (B/8π²)·(D G* D)_aa grid steps² (D = diag N)
    covs = [np.diag(n_grid) @ (f @ f.T) @ np.diag(n_grid) / EIGHT_PI2 for f in fracs]
    var_per_b = np.max([np.diag(c) for c in covs], axis=0)
    b_box = _form_factor_extent(ff, b_hi + b_margin + b_blur, log_eps_box)

    def box_of(b):
        return tuple(int(math.ceil(2.0 * math.sqrt(2.0 * log_eps_box * v * b))) for v in var_per_b)

    class_points = CLASS_MIN_POINTS if class_points is None else float(class_points)
    groups, iso_classes = _iso_and_aniso_classes(b_box, box_of, n_classes, u_aniso, iso_atoms, class_points)
    if reuse_classes:
        key = _layout_key(grid, orth, log_eps_box, n_classes, ff.type_index, u_aniso is not None, iso_atoms)
        groups, iso_classes = _stored_or_new_classes(key, groups, iso_classes, b_box, iso_atoms)
    metrics = [np.diag(1.0 / n_grid) @ (o.T @ o) @ np.diag(1.0 / n_grid)
               for o in [orth] + [np.asarray(c.orth, float) for c in others]]
    g_metric = metrics[0]
    cross = tuple(p for p in PAIRS if any(_has_cross(g, p) for g in metrics))
    idx, conj = _sample_indices(h_rot.reshape(-1, 3), grid)
    phase = np.exp(2j * np.pi * np.einsum("ri,oi->or", hkl.astype(float), np.asarray(crystal.trans, float)))
    meta = SFMeta(
        method="fft",
        n_refl=n_refl,
        chunk=0,
        grid_shape=grid,
        box=tuple(box for box, _, _ in groups),
        rows=tuple(tuple(sorted(set().union(*(box_rows(box, c[:2, :2] * b, 2.0 * log_eps_box) for c in covs))))
                   for box, _, b in groups),
        cross_terms=cross,
        constant=constant,
        iso_classes=iso_classes,
    )
    return SFSetup(
        **common,
        b_blur=on_device(b_blur, dtype),
        grid_metric=on_device(g_metric, dtype),
        sample_index=on_device(idx.reshape(n_ops, n_refl, 3)),
        sample_conj=on_device(conj.reshape(n_ops, n_refl)),
        sample_phase=on_device(phase, jnp.result_type(dtype, jnp.complex64)),
        box_atoms=tuple(on_device(atoms, jnp.int32) for _, atoms, _ in groups),
        meta=meta,
    )


def _has_cross(g_metric, p) -> bool:
    """Whether the grid metric couples axes p = (i, j) (an off-diagonal entry above rounding)."""
    return abs(g_metric[p]) > 1e-9 * math.sqrt(abs(g_metric[p[0], p[0]]) * abs(g_metric[p[1], p[1]]))


def _form_factor_extent(ff: FormFactors, b_total, log_eps_box: float, z_floor: float = 6.0):
    """(n,) B (Å²) of the single Gaussian cut at the same radius as each atom's whole density.

    An atom of total blur B (displacement + B_blur) has the density
    ρ(r) = Σ_k a_k (4π/B_k)^{3/2} exp(−4π² r²/B_k), B_k = B + b_k (its form factor's Gaussians,
    the constant as b = 0).  The radius where ρ falls to eps_box·ρ(0)·max(1, z_floor/Z) is found by
    bisection (Z = f0(0), the atom's electrons): atoms lighter than carbon are cut at the density level
    of a carbon of their shape, so a hydrogen (Z = 1) leaves no more density outside its box than a carbon
    does, in a box of ~0.6 the volume.  A single Gaussian of B_eff = 4π² r²/ln(1/eps_box) is cut there,
    so the box rules made for single Gaussians apply.
    """
    t = np.asarray(ff.type_index)
    a = np.concatenate([np.asarray(ff.a, float)[t], np.asarray(ff.c, float)[t][:, None]], axis=1)
    bk = np.asarray(b_total, float)[:, None] + np.concatenate([np.asarray(ff.b, float)[t], np.zeros((len(t), 1))], axis=1)
    bk = np.maximum(bk, 1e-3)
    amp = a * (4.0 * np.pi / bk) ** 1.5
    z = np.maximum(np.abs(a.sum(1)), 1e-6)
    level = amp.sum(1) * math.exp(-log_eps_box) * np.maximum(1.0, z_floor / z)  # eps_box of the (carbon's) peak

    def rho(r2):
        return (amp * np.exp(-4.0 * np.pi**2 * r2[:, None] / bk)).sum(1)

    # each term below level/K at hi: the sum is below level there
    k = amp.shape[1]
    hi = (bk / (4.0 * np.pi**2) * np.log(np.maximum(k * np.abs(amp) / level[:, None], 1.0))).max(1) + 1e-6
    lo = np.zeros_like(hi)
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        above = rho(mid) > level
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    return 4.0 * np.pi**2 * hi / log_eps_box


def _adp_extent(b_iso, u_aniso):
    """(n,) smallest and largest equivalent B (Å²) of each atom's displacement ellipsoid."""
    if u_aniso is None or not len(u_aniso):
        return b_iso, b_iso
    u = np.asarray(u_aniso, float)
    eig = np.linalg.eigvalsh(np.stack([u[:, [0, 3, 4]], u[:, [3, 1, 5]], u[:, [4, 5, 2]]], 1))
    return b_iso + EIGHT_PI2 * eig[:, 0].clip(min=0.0), b_iso + EIGHT_PI2 * eig[:, 2].clip(min=0.0)


def _box_classes(b_box, box_of, n_classes: int, class_points: float = 0.0):
    """Split atoms into up to n_classes groups of one box size each, minimising Σ n · box volume
    + class_points × the number of classes.

    Class boundaries are searched (exhaustively, by dynamic programming) among the 5 % quantiles
    of the sorted B.

    Args:
        b_box: (n,) B (Å²) each atom's box must hold.
        box_of: B -> (bx, by, bz).
        n_classes: maximum number of classes (>= 1).
        class_points: box points a further class must save (see CLASS_MIN_POINTS).

    Returns:
        list of (box, sorted atom indices, largest B of the class), one per non-empty class.
    """
    n = len(b_box)
    if n == 0:
        return [((2, 2, 2), np.zeros(0, np.int64), 1.0)]
    order = np.argsort(b_box, kind="stable")
    b_sorted = b_box[order]
    cuts = sorted({int(q * n) for q in np.arange(0.05, 1.0, 0.05)} - {0, n}) + [n]

    def cost(i, j):  # atoms sorted[i:j] in one class
        return (j - i) * float(np.prod(box_of(b_sorted[j - 1])))

    # best[(k, e)]: (minimal cost of atoms [0, e) in k classes, start of the last class)
    best = {(1, e): (cost(0, e), 0) for e in cuts}
    for k in range(2, max(n_classes, 1) + 1):
        for e in cuts:
            options = [(best[(k - 1, s)][0] + cost(s, e), s) for s in cuts if s < e and (k - 1, s) in best]
            if options:
                best[(k, e)] = min(options)
    k_best = min((k for k in range(1, max(n_classes, 1) + 1) if (k, n) in best),
                 key=lambda k: best[(k, n)][0] + k * class_points)
    bounds, e, k = [], n, k_best
    while k >= 1:
        s = best[(k, e)][1]
        bounds.append((s, e))
        e, k = s, k - 1
    return [(box_of(b_sorted[j - 1]), np.sort(order[i:j]), float(b_sorted[j - 1])) for i, j in reversed(bounds)]


# Spreading an anisotropic Gaussian costs about twice an isotropic one per box point (4xof's energy gradient with
# every atom isotropic: 14-18 ms against 27 ms; the isotropic metric factorises over the axes of an orthogonal
# cell).  Atoms whose U stays zero (riding hydrogens) in a model with U get classes of their own when that lowers
# Σ cost × n × box volume with this relative cost, within the same number of classes.
ISO_POINT_COST = 0.5
# Each box class is a spreading (and its gradient) of its own in every program: ~0.4 s more XLA compilation of a cold
# run per class (4xof's energy gradient 2.7 / 3.1 / 3.5 s with 1 / 2 / 3 classes, session 23), while spreading 1e5
# box points costs ~0.6 ms an evaluation (~0.1 s over a refinement's ~200).  A class is made only where it saves at
# least this many points: 5e5z's 47 atoms take one class (141 k points against 108 k with three; its cold run 5.6-6.0 ->
# 4.7-5.0 s, warm unchanged); the other shared entries keep their classes (the last saves 0.18-0.73 M points).
CLASS_MIN_POINTS = 1.0e5


def _class_cost(groups, iso_classes=()) -> float:
    """Box points a layout spreads (Σ atoms × box volume), its isotropic classes at ISO_POINT_COST."""
    return float(sum(len(atoms) * np.prod(box) * (ISO_POINT_COST if c in iso_classes else 1.0)
                     for c, (box, atoms, _) in enumerate(groups)))


def _iso_and_aniso_classes(b_box, box_of, n_classes: int, u_aniso, iso_atoms, class_points: float = 0.0):
    """(box classes as :func:`_box_classes`, indices of the classes spread isotropically): with ``u_aniso`` and
    some but not all atoms in ``iso_atoms``, the two kinds split into classes of their own (the split of
    ``n_classes`` between them with the lowest cost, see ISO_POINT_COST) unless one set of classes for all atoms
    costs less with ``class_points`` per class; else one set of classes (none isotropic)."""
    single = _box_classes(b_box, box_of, n_classes, class_points)
    iso = None if iso_atoms is None or u_aniso is None else np.asarray(iso_atoms, bool).reshape(-1)
    if iso is None or not iso.any() or iso.all() or n_classes < 2:
        return single, ()
    idx_a, idx_i = np.flatnonzero(~iso), np.flatnonzero(iso)
    best = None
    for k_a in range(1, n_classes):
        ga = _box_classes(b_box[idx_a], box_of, k_a, class_points)
        gi = _box_classes(b_box[idx_i], box_of, n_classes - k_a, class_points)
        cost = _class_cost(ga) + ISO_POINT_COST * _class_cost(gi) + class_points * (len(ga) + len(gi))
        if best is None or cost < best[0]:
            best = (cost, ga, gi)
    if class_points > 0 and _class_cost(single) + class_points * len(single) < best[0]:
        return single, ()
    _, ga, gi = best
    groups = [(box, idx_a[atoms], b) for box, atoms, b in ga] + [(box, idx_i[atoms], b) for box, atoms, b in gi]
    return groups, tuple(range(len(ga), len(groups)))


# A rerun from the refined model would split its atoms into other box classes (the classes follow the model's B:
# 1va7's shaken start (11,12,12)/(13,14,14)/(16,19,19) boxes, its refined model (11,12,12)/(11,13,13)/(13,15,15)),
# and the classes are static shapes: the rerun compiled every program again (11.7 s against 7.8 s with them kept).
# With ``reuse_classes`` (``runtime.reuse_box_classes``; off by default, since a model's layout then depends on what
# ran before in the cache folder, and F_calc with it at the box truncation's ~1e-4) the chosen layout (box, atom
# count and largest B of each class) is stored per problem (the atoms' types on one grid), and a later setup of the
# same atoms takes the stored layout when its atoms, sorted by B, fit the stored classes and spread at most
# STORED_CLASS_COST times the points of the best layout for them (bigger boxes only cut the Gaussians further out:
# F is as accurate or more).
STORED_CLASS_TABLE = "box_classes"
STORED_CLASS_COST = 1.5
STORED_CLASS_ENTRIES = 64  # layouts kept (the most recent problems)


def _layout_key(grid, orth, log_eps_box: float, n_classes: int, type_index, has_u: bool, iso_atoms) -> str:
    """A digest of what a box layout is valid for: the grid and cell (boxes in grid steps), the box rule, the atoms'
    types in order, whether U is spread and which atoms are isotropic."""
    import hashlib

    h = hashlib.sha256()
    h.update(repr((tuple(grid), np.round(np.asarray(orth, float), 6).tolist(), round(float(log_eps_box), 9),
                   int(n_classes), bool(has_u))).encode())
    h.update(np.ascontiguousarray(np.asarray(type_index, np.int32)).tobytes())
    h.update(b"-" if iso_atoms is None else np.packbits(np.asarray(iso_atoms, bool).reshape(-1)).tobytes())
    return h.hexdigest()[:32]


def _classes_from_layout(layout, b_box, iso_atoms):
    """The stored ``layout`` ([box, count, b, isotropic] per class) filled with these atoms, sorted by ``b_box``
    within each kind (isotropic or not) as :func:`_box_classes` sorts them; None when they do not fit (other counts,
    or an atom needing more than its class's B)."""
    n = len(b_box)
    iso = np.zeros(n, bool) if iso_atoms is None else np.asarray(iso_atoms, bool).reshape(-1)
    if not any(c[3] for c in layout):
        iso = np.zeros(n, bool)  # one set of classes for all atoms
    groups, iso_classes = [None] * len(layout), []
    for kind in (False, True):
        members = np.flatnonzero(iso == kind)
        classes = [k for k, c in enumerate(layout) if bool(c[3]) == kind]
        if sum(int(layout[k][1]) for k in classes) != len(members):
            return None
        order = members[np.argsort(b_box[members], kind="stable")]
        start = 0
        for k in classes:
            box, count, b = tuple(int(v) for v in layout[k][0]), int(layout[k][1]), float(layout[k][2])
            atoms = order[start:start + count]
            start += count
            if count == 0 or float(b_box[atoms].max()) > b:
                return None
            groups[k] = (box, np.sort(atoms), b)
            if kind:
                iso_classes.append(k)
    return groups, tuple(iso_classes)


def _stored_or_new_classes(key: str, groups, iso_classes, b_box, iso_atoms):
    """The stored layout for ``key`` filled with these atoms when they fit it at no more than STORED_CLASS_COST
    times the cost of ``groups`` (the best layout for them, which is stored otherwise)."""
    table = read_table(STORED_CLASS_TABLE)
    layout = table.get(key)
    if isinstance(layout, list):
        try:
            stored = _classes_from_layout(layout, np.asarray(b_box, float), iso_atoms)
        except (TypeError, ValueError, IndexError):  # a table of another shape: choose anew
            stored = None
        if stored is not None and _class_cost(*stored) <= STORED_CLASS_COST * _class_cost(groups, iso_classes):
            log.info("FFT box classes: an earlier run's kept (boxes %s for %s atoms; this model's own: %s for %s), so "
                     "its compiled programs are reused (runtime.reuse_box_classes)",
                     [box for box, _, _ in stored[0]], [len(a) for _, a, _ in stored[0]],
                     [box for box, _, _ in groups], [len(a) for _, a, _ in groups])
            return stored
    table.pop(key, None)
    table[key] = [[list(box), int(len(atoms)), float(b), c in iso_classes] for c, (box, atoms, b) in enumerate(groups)]
    write_table(STORED_CLASS_TABLE, dict(list(table.items())[-STORED_CLASS_ENTRIES:]))
    return groups, iso_classes


# ---------------------------------------------------------------------------------- direct


def _direct_chunk(xyz_frac, b_iso, occ, hkl, s2, symops: SymOps, ff: FormFactors, u_frac=None):
    """F for one chunk of reflections: (n_chunk,) complex.

    u_frac: (n_atoms, 3, 3) covariance of the fractional coordinates (frac U fracᵀ) or None.
    """
    f_types = f0(ff, s2)  # (r, t)
    f_atoms = f_types[:, ff.type_index]  # (r, n)
    f_atoms = f_atoms * occ[None, :] * jnp.exp(-b_iso[None, :] * s2[:, None] / 4.0)
    # h·(R x + t) = (R^T h)·x + h·t
    h = hkl.astype(xyz_frac.dtype)
    h_rot = jnp.einsum("ri,oij->orj", h, symops.rot)  # (ops, r, 3) = h R
    phase_t = jnp.einsum("ri,oi->or", h, symops.trans)  # (ops, r)
    arg = TWO_PI * (jnp.einsum("orj,nj->orn", h_rot, xyz_frac) + phase_t[:, :, None])
    if u_frac is None:
        geom_re = jnp.cos(arg).sum(0)  # (r, n)
        geom_im = jnp.sin(arg).sum(0)
    else:
        # Debye–Waller of the copy: exp(−2π² (Rᵀh)ᵀ U_frac (Rᵀh))
        quad = jnp.einsum("ora,nab,orb->orn", h_rot, u_frac, h_rot)
        dw = jnp.exp(-2.0 * np.pi**2 * quad)
        geom_re = (dw * jnp.cos(arg)).sum(0)
        geom_im = (dw * jnp.sin(arg)).sum(0)
    return (f_atoms * geom_re).sum(1) + 1j * (f_atoms * geom_im).sum(1)


def f_calc_direct(
    xyz_frac, b_iso, occ, hkl, s2, symops: SymOps, ff: FormFactors, chunk: int = 256, u_aniso=None, frac=None
):
    """Exact structure factors by direct summation, chunked over reflections.

    Each chunk is rematerialised in the backward pass (``jax.checkpoint``), so the memory of
    F and of its gradient is ~ chunk · n_atoms · n_ops, not n_refl · n_atoms · n_ops.

    Args:
        xyz_frac: (n_atoms, 3) fractional coordinates.
        b_iso: (n_atoms,) isotropic B (Å²).
        occ: (n_atoms,) occupancies.
        hkl: (n_refl, 3) int Miller indices.
        s2: (n_refl,) 1/d² (Å⁻²).
        symops: space-group operators.
        ff: form factors (type_index of length n_atoms).
        chunk: reflections per chunk (memory ~ chunk · n_atoms · n_ops).
        u_aniso: (n_atoms, 6) Cartesian U (Å², PDB ANISOU order) added to b_iso/(8π²)·I, or None.
        frac: (3, 3) Cartesian -> fractional matrix; required with u_aniso.

    Returns:
        (n_refl,) complex F_calc (electrons).
    """
    n = hkl.shape[0]
    chunk = int(max(1, min(chunk, n)))
    n_pad = (-n) % chunk
    hkl_p = jnp.concatenate([jnp.asarray(hkl), jnp.zeros((n_pad, 3), dtype=jnp.asarray(hkl).dtype)])
    s2_p = jnp.concatenate([jnp.asarray(s2), jnp.zeros((n_pad,), dtype=jnp.asarray(s2).dtype)])
    hkl_c = hkl_p.reshape(-1, chunk, 3)
    s2_c = s2_p.reshape(-1, chunk)
    u_frac = None
    if u_aniso is not None:
        if frac is None:
            raise ValueError("f_calc_direct: u_aniso needs the frac matrix of the cell")
        frac = jnp.asarray(frac, xyz_frac.dtype)
        u_frac = jnp.einsum("ia,nab,jb->nij", frac, _u6_to_mat(u_aniso), frac)

    @jax.checkpoint
    def one(a):
        return _direct_chunk(xyz_frac, b_iso, occ, a[0], a[1], symops, ff, u_frac)

    out = jax.lax.map(one, (hkl_c, s2_c))
    return out.reshape(-1)[:n]


# ------------------------------------------------------------------------------------- fft


def _atom_gaussians(ff: FormFactors, atoms, constant: bool = True):
    """(n_c, K) amplitudes (electrons) and widths b_k (Å²) of the form factors of ``atoms``: the
    Gaussians, with the constant c as a Gaussian of width 0 when ``constant``."""
    t = ff.type_index[atoms]
    if not constant:
        return ff.a[t], ff.b[t]
    c = ff.c[t][:, None]
    return jnp.concatenate([ff.a[t], c], axis=1), jnp.concatenate([ff.b[t], jnp.zeros_like(c)], axis=1)


def density_grid(xyz_frac, b_iso, occ, setup: SFSetup, u_aniso=None, symmetry: bool = True):
    """Blurred electron density of the unit cell on one grid.

    ρ(r) = Σ_{j, ops} occ_j Σ_k a_jk N(r; R x_j + t, U_j + (B_j + B_blur + b_jk)/(8π²) I): each
    atom's form factor f0(s) = Σ_k a_k exp(−b_k s²/4) + c (the constant as b = 0) is a sum of
    normalised Gaussians in real space, each convolved with the atom's displacement (the Fourier
    transform of N(0, U) is exp(−2π² sᵀ U s); Trueblood et al. 1996, Acta Cryst. A52, 770), cut
    to a box whose size is chosen per class of atoms in make_sf_setup.  All scattering types
    share the grid, so one FFT serves any number of elements.

    Args:
        xyz_frac: (n_atoms, 3) fractional coordinates.
        b_iso: (n_atoms,) B (Å²).
        occ: (n_atoms,) occupancies.
        setup: an fft :class:`SFSetup`.
        u_aniso: (n_atoms, 6) Cartesian U (Å²) or None.
        symmetry: spread every symmetry copy (the unit cell's density); False: the atoms as given.

    Returns:
        (na, nb, nc) electrons per grid point (ρ·V/N, so that the FFT gives F in electrons).
    """
    meta = setup.meta
    grid = meta.grid_shape
    dtype = xyz_frac.dtype
    n_grid = jnp.asarray(grid, dtype)
    rot, trans = (setup.rot, setup.trans) if symmetry else (jnp.eye(3, dtype=dtype)[None], jnp.zeros((1, 3), dtype))
    n_ops = rot.shape[0]
    p_all = (jnp.einsum("oij,nj->oni", rot, xyz_frac) + trans[:, None, :]) * n_grid  # (ops, n, 3)
    if u_aniso is not None:
        u_cart = _u6_to_mat(u_aniso) + ((b_iso + setup.b_blur) / EIGHT_PI2)[:, None, None] * jnp.eye(3, dtype=dtype)
        u_frac = jnp.einsum("ia,nab,jb->nij", setup.frac, u_cart, setup.frac)
        g_star = setup.frac @ setup.frac.T  # an isotropic U of 1 Å² in fractional coordinates
    pad = max(box[2] for box in meta.box)
    rho = jnp.zeros(tuple(grid[:2]) + (grid[2] + pad,), dtype)
    aniso = [c for c in range(len(meta.box)) if u_aniso is not None and c not in meta.iso_classes]
    if aniso:  # every anisotropic class's inverse covariances at once: one 3×3 inverse in the program, not one per class
        everyone = jnp.concatenate([setup.box_atoms[c] for c in aniso])
        _, b_all = _atom_gaussians(setup.ff, everyone, meta.constant)
        u_k = u_frac[everyone][:, None] + (b_all.astype(dtype) / EIGHT_PI2)[..., None, None] * g_star  # (n, K, 3, 3)
        cov = jnp.einsum("oia,nkab,ojb->onkij", rot, u_k, rot) * (n_grid[:, None] * n_grid[None, :])
        metric_all, det_all = _inv_det_3x3(cov)  # (ops, n, K, 3, 3), (ops, n, K)
        ends = dict(zip(aniso, np.cumsum([setup.box_atoms[c].shape[0] for c in aniso])))
    if len(aniso) < len(meta.box):
        det_gm = jnp.sqrt(jnp.linalg.det(setup.grid_metric))
    for c, (atoms, box, rows) in enumerate(zip(setup.box_atoms, meta.box, meta.rows)):
        a_k, b_k = _atom_gaussians(setup.ff, atoms, meta.constant)
        a_k, b_k = a_k.astype(dtype), b_k.astype(dtype)
        p = p_all[:, atoms].reshape(-1, 3)
        if c not in aniso:  # isotropic: B (+ blur + b_k) alone
            inv_var = EIGHT_PI2 / (b_iso[atoms][:, None] + setup.b_blur + b_k)  # (c, K)
            metric = jnp.tile(inv_var[..., None, None] * setup.grid_metric, (n_ops, 1, 1, 1))
            norm = jnp.tile(inv_var**1.5 * det_gm, (n_ops, 1))  # (2π)^-3/2 det(M)^1/2, M = inv_var Gᵍ
            z_coupled = any(2 in pair for pair in meta.cross_terms)
        else:
            hi = ends[c]
            lo = hi - atoms.shape[0]
            metric, det = metric_all[:, lo:hi], det_all[:, lo:hi]  # (ops, c, K, 3, 3), (ops, c, K)
            metric = metric.reshape((-1,) + metric.shape[2:])
            norm = (1.0 / jnp.sqrt(det)).reshape(-1, det.shape[-1])
            z_coupled = True
        weight = jnp.tile(occ[atoms][:, None] * a_k, (n_ops, 1)) * norm * (2.0 * np.pi) ** -1.5
        if c > 0:  # one class at a time: its boxes computed once the previous class is on the grid
            p = _after(p, rho)
        rho = spread_boxes(rho, p, metric, weight, grid, box, rows, z_coupled)
    return fold_periodic_c(rho, grid[2])


def _f_fft(xyz_frac, b_iso, occ, setup: SFSetup, u_aniso=None):
    """F by Gaussian spreading + FFT (see module docstring); (n_refl,) complex."""
    rho = density_grid(xyz_frac, b_iso, occ, setup, u_aniso, symmetry=False)
    return _sample(rho, setup) * jnp.exp(setup.b_blur * setup.s2 / 4.0)


def _sample(grid_values, setup: SFSetup):
    """Σ_ops exp(2πi h·t) Σ_x g(x) exp(2πi (Rᵀh)·x) of (..., na, nb, nc) real grids of the
    asymmetric-unit atoms: the structure factor of all symmetry copies, (..., n_refl)."""
    ft = jnp.fft.rfftn(grid_values, axes=(-3, -2, -1))
    vals = _read_half_complex(ft, setup.sample_index.reshape(-1, 3), setup.sample_conj.reshape(-1))
    vals = vals.reshape(vals.shape[:-1] + setup.sample_conj.shape)  # (..., ops, r)
    return jnp.sum(vals * setup.sample_phase.astype(vals.dtype), axis=-2)


def _read_half_complex(ft, idx, conj):
    """Values of a half-complex (rfftn) array at (n, 3) indices, conjugated where conj: (..., n)."""
    vals = _read_points(ft, idx, tuple(ft.shape))
    return jnp.where(conj, jnp.conj(vals), vals)


# --------------------------------------------------------------------- the order of large temporaries
# XLA's CPU backend drops optimisation barriers before it schedules a program, and its scheduler placed the spreading
# values of every box class before the first class's scatter, and the zero grid of the sampling's transpose at the
# start of the forward pass: all of them allocated at once (1l2h's L-BFGS program: 41 MB of temporaries, 16 MB of
# them the three classes' values, 4 MB the zero grid).  The two functions below order them by data dependencies.
def _after(x, y):
    """``x``, computed only once ``y`` is: x + 0·y[first] (a float multiplication by zero, which XLA does not fold;
    no gradient flows through y)."""
    return x + 0.0 * jax.lax.stop_gradient(y.reshape(-1)[0]).astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _read_points(ft, idx, shape: tuple):
    """``ft[..., idx[:, 0], idx[:, 1], idx[:, 2]]`` (``shape``: ft's), differentiable wrt ``ft``; read through one
    flat index (indexing by the three columns built an (n, 3) copy of them in every evaluation)."""
    return ft.reshape(shape[:-3] + (-1,))[..., _flat_index(idx, shape)]


def _flat_index(idx, shape: tuple):
    """(n,) positions of (n, 3) indices into the last three axes of ``shape``, flattened."""
    return (idx[:, 0] * shape[-2] + idx[:, 1]) * shape[-1] + idx[:, 2]


def _read_points_fwd(ft, idx, shape):
    return _read_points(ft, idx, shape), idx


def _read_points_bwd(shape, idx, ct):
    """The transpose: the cotangent added onto a zero grid (as JAX's own rule for the gather), the zero grid made
    from the cotangent so that it is allocated only once the backward pass reaches it."""
    # 0·ct[first], linear in ct (no stop_gradient: the Gauss–Newton step and the uncertainties transpose this rule)
    zero = jnp.broadcast_to(0.0 * ct.reshape(-1)[0], shape[:-3] + (math.prod(shape[-3:]),))
    return zero.at[..., _flat_index(idx, shape)].add(ct).reshape(shape), None


_read_points.defvjp(_read_points_fwd, _read_points_bwd)


def f_from_grid(grid, hkl, setup):
    """Structure factors of a real-space unit-cell grid, sampled at hkl.

    F(h) = (V/N) Σ_x ρ(x) exp(2πi h·x): for a grid of electron density (e/Å³) this is F in
    electrons; for a 0/1 solvent mask it is the mask's transform F_mask (Jiang & Brünger 1994,
    J. Mol. Biol. 243, 100).

    Args:
        grid: (na, nb, nc) real values at the grid points x = (i/na, j/nb, k/nc); any shape with
            |h_a| < n_a/2 for every reflection (static under jit); an integer grid (a 0/1 mask) is read as float32.
        hkl: (n_refl, 3) int Miller indices.
        setup: an :class:`SFSetup` or a :class:`jaxrefine.core.crystal.Crystal` (only its volume is used).

    Returns:
        (n_refl,) complex.
    """
    shape = tuple(grid.shape[-3:])
    volume = setup.volume
    if not jnp.issubdtype(grid.dtype, jnp.floating):  # a 0/1 mask (uint8): exact in float32
        grid = grid.astype(jnp.float32)
    hkl = jnp.asarray(hkl)
    conj = hkl[:, 2] > 0
    idx = jnp.where(conj[:, None], hkl, -hkl) % jnp.asarray(shape, hkl.dtype)[None]
    vals = _read_half_complex(jnp.fft.rfftn(grid, axes=(-3, -2, -1)), idx, conj)
    return vals * (volume / float(np.prod(shape)))


class _CellVolume(NamedTuple):
    volume: Any  # Å³


@jax.jit
def _f_from_grid_compiled(grid, hkl, volume):
    return f_from_grid(grid, hkl, _CellVolume(volume))


def f_from_grid_jit(grid, hkl, volume: float):
    """:func:`f_from_grid` as one compiled program (host code: solvent masks), for a cell of ``volume`` Å³ (an
    argument: cells of one grid share the program, e.g. a screen's crystals).  Run op by op it compiled a dozen
    one-operation programs per process."""
    return _f_from_grid_compiled(on_device(grid), on_device(hkl), on_device(volume, np.float32))


# ----------------------------------------------------------------------------- entry point


def structure_factors(xyz_frac, b_iso, occ, setup: SFSetup, u_aniso=None):
    """F_calc of a model at the setup's reflections (jit-able, differentiable).

    Args:
        xyz_frac: (n_atoms, 3) fractional coordinates (asymmetric unit).
        b_iso: (n_atoms,) isotropic B (Å²).
        occ: (n_atoms,) occupancies.
        setup: from :func:`make_sf_setup` (pass it as a jit argument).
        u_aniso: (n_atoms, 6) Cartesian U (Å², U11 U22 U33 U12 U13 U23) added to b_iso/(8π²)·I,
            or None (isotropic; faster).

    Returns:
        (n_refl,) complex F_calc (electrons).
    """
    if setup.meta.method == "direct":
        return f_calc_direct(
            xyz_frac,
            b_iso,
            occ,
            setup.hkl,
            setup.s2,
            SymOps(setup.rot, setup.trans),
            setup.ff,
            chunk=setup.meta.chunk,
            u_aniso=u_aniso,
            frac=setup.frac,
        )
    return _f_fft(xyz_frac, b_iso, occ, setup, u_aniso)


# one compiled program per problem for host code (run op by op, F_calc was ~120 one-operation programs, each
# compiled once per shape: 120 of notebook 04's 2000 compilations, 7.5 s of the synthetic demo crystal's 14.5 s)
structure_factors_jit = jax.jit(structure_factors)
