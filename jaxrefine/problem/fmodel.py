"""F_model of a model against its data, outside jit: F_calc, solvent mask, scale fit, σA.

:func:`compute_fmodel` / :func:`fmodel_statistics` are the pipeline behind ``jaxrefine rfactors``;
the pure F_model formula is :func:`jaxrefine.xray.fmodel.f_model`.
"""
from __future__ import annotations

import logging
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core.device import on_device
from ..xray.fmodel import f_model
from ..xray.scaling import Scales, fit_scales, reciprocal_vectors
from ..xray.stats import r_factor_best_scale, r_factors
from ..xray.structure_factors import structure_factors_jit
from ..xray.targets import SigmaA, choose_sigma_a_set, estimate_sigma_a, sigma_a_bins

log = logging.getLogger(__name__)

# Å: with data stopping at d_min >= this, F_model has only the smooth scale (k_overall and the
# anisotropic B), no resolution-dependent k_iso(s²).  At 3.2 Å (5kzb) a refitted k_iso absorbed the
# fall-off the B-factors should carry: the refined model scored R-free 0.257 under jaxrefine's
# F_model but 0.283 under servalcat's; refined without k_iso it scores 0.257 under the full F_model
# (rfactors) and 0.276 under servalcat's.  At 1.54 Å (1l2h) servalcat's score was the same either way.
# The same rule in refinement and in ``rfactors`` / validation, so that both report one R: with k_iso in
# rfactors alone, 5kzb's refined model scored R-free 0.253 there against 0.264 in the refinement's log and
# under servalcat's yardstick (2026-12-01).
SMOOTH_SCALE_D_MIN = 2.5


def resolution_scale_for(d_min: float) -> bool:
    """Whether F_model fits the resolution-dependent scale k_iso(s²) for data to ``d_min`` (Å)."""
    return bool(d_min < SMOOTH_SCALE_D_MIN)


class FmodelResult(NamedTuple):
    """Everything computed for a model against its data (arrays in the data's reflection order).

    Attributes:
        f_calc, f_mask, f_model: (n,) complex.
        s_cart: (n, 3) Å⁻¹.
        scales: fitted :class:`Scales`.
        sigma_a: :class:`SigmaA` (D, S per bin).
        sigma_a_set: "free" or "work" (the reflections σA was estimated from).
        mask_grid_shape: (3,) solvent-mask grid.
        solvent_fraction: fraction of the cell that is bulk solvent.
        timings: seconds per step.
    """

    f_calc: np.ndarray
    f_mask: np.ndarray
    f_model: np.ndarray
    s_cart: np.ndarray
    scales: Scales
    sigma_a: SigmaA
    sigma_a_set: str
    mask_grid_shape: tuple
    solvent_fraction: float
    timings: dict
    complete: tuple | None = None  # (hkl_all (m, 3), f_calc_all, f_mask_all, obs_pos (n,)) when computed


def complete_set(refl):
    """All unique reflections in the data's resolution range, and the position of each observed one.

    Returns:
        (hkl_all (m, 3) int, obs_pos (n,) int index of ``refl.hkl[i]`` in hkl_all, or −1).
    """
    from ..core.crystal import d_spacing
    from ..io.maps_io import complete_hkl

    hkl_all = complete_hkl(refl.crystal, refl.d_min - 1e-6)
    hkl_all = hkl_all[d_spacing(hkl_all, refl.crystal) <= refl.d_max + 1e-6]
    index = {tuple(h): i for i, h in enumerate(hkl_all.tolist())}
    obs_pos = np.array([index.get(tuple(h), -1) for h in refl.hkl.tolist()], dtype=np.int64)
    if np.any(obs_pos < 0):  # observed reflections outside gemmi's asymmetric unit: keep them too
        extra = refl.hkl[obs_pos < 0]
        obs_pos[obs_pos < 0] = len(hkl_all) + np.arange(len(extra))
        hkl_all = np.concatenate([hkl_all, extra])
    return hkl_all, obs_pos


DIRECT_WORK_LIMIT = 3e7  # atoms × operators × reflections below which "auto" sums directly (no FFT compile)


def model_f_calc(model, crystal, hkl, method: str = "auto"):
    """F_calc of a :class:`jaxrefine.io.model.Model` at hkl (anisotropic ADPs included).

    ``method``: "fft", "direct", or "auto" (direct summation for small problems, where it is
    faster than compiling the FFT path; see DIRECT_WORK_LIMIT).
    """
    from ..io.formfactor_io import it92_form_factors
    from ..xray.structure_factors import make_sf_setup, split_adp

    if method == "auto":
        work = float(model.n_atoms) * crystal.n_ops * len(hkl)
        method = "direct" if work < DIRECT_WORK_LIMIT else "fft"
    ff = it92_form_factors(model.element, model.source)
    b_iso, u_aniso = split_adp(model.b_iso, model.u_aniso, model.has_aniso)
    u = u_aniso if np.any(model.has_aniso) else None
    setup = make_sf_setup(crystal, hkl, ff, method=method, b_iso=model.b_iso, u_aniso=u)
    dtype = setup.s2.dtype
    xyz_frac, b, occ = (on_device(a, dtype) for a in (crystal.to_frac(model.xyz_cart), b_iso, model.occ))
    f = structure_factors_jit(xyz_frac, b, occ, setup, None if u is None else on_device(u, dtype))
    return np.asarray(f)


def model_f_mask(model, crystal, hkl, d_min: float, r_probe: float = 1.0, r_shrink: float = 0.8, xyz_cart=None):
    """(F_mask (n,) complex, grid shape, solvent fraction) of the model's bulk-solvent mask."""
    from ..io.mask import mask_grid_shape, solvent_mask
    from ..xray.structure_factors import f_from_grid_jit

    shape = mask_grid_shape(crystal, d_min)
    hmax = np.abs(np.asarray(hkl)).max(axis=0)
    shape = tuple(int(max(n, 2 * h + 2)) for n, h in zip(shape, hmax))
    grid = solvent_mask(model, crystal, shape, r_probe=r_probe, r_shrink=r_shrink, xyz_cart=xyz_cart)
    return np.asarray(f_from_grid_jit(grid, hkl, crystal.volume)), shape, float(grid.mean())


def fit_scales_and_sigma_a(f_obs, sig_f_obs, f_calc, f_mask, s_cart, work, sigma_a_use, bins, centric, epsilon, crystal,
                           use_solvent: bool = True, resolution_scale: bool = True):
    """The X-ray state fit for fixed F_calc and F_mask: scales on the work set, then F_model, then σA.

    The one fit behind refinement (:func:`jaxrefine.problem.xray_state.update_xray_state`),
    ``rfactors``, validation and omit maps (:func:`compute_fmodel`).  Outside jit.

    Args:
        f_obs, sig_f_obs: (n,) observed amplitudes and their σ.
        f_calc, f_mask: (n,) complex structure factors of the atoms and of the solvent mask.
        s_cart: (n, 3) Cartesian reciprocal vectors (Å⁻¹).
        work: (n,) bool reflections the scales are fitted on.
        sigma_a_use, bins: (n,) bool reflections σA is estimated from and (n,) int σA bin.
        centric, epsilon: (n,) centric flags and epsilon factors.
        crystal: :class:`jaxrefine.core.crystal.Crystal` (symmetry constraints of the anisotropic scale).
        use_solvent: False: no bulk solvent (k_sol = 0).
        resolution_scale: also fit the resolution-dependent scale k_iso(s²) (False: the smooth
            k_overall · anisotropic scale only, as servalcat's F_model).

    Returns:
        (:class:`jaxrefine.xray.scaling.Scales`, (n,) complex F_model, :class:`jaxrefine.xray.targets.SigmaA`).
    """
    f_obs = np.asarray(f_obs)
    scales = fit_scales(f_obs, np.asarray(f_calc), np.asarray(f_mask), np.asarray(s_cart), np.asarray(work), crystal,
                        use_solvent=use_solvent, resolution_scale=resolution_scale)
    # F_model in numpy (host arrays: no program; jitted it was one more program to trace and load per run)
    fm = f_model(np.asarray(f_calc), np.asarray(f_mask), np.asarray(s_cart), jax.tree_util.tree_map(np.asarray, scales))
    sigma_a = estimate_sigma_a(f_obs, np.asarray(fm), np.asarray(sigma_a_use), np.asarray(bins), np.asarray(centric),
                               np.asarray(epsilon), np.asarray(sig_f_obs))
    return scales, fm, sigma_a


def compute_fmodel(model, refl, f_calc=None, f_mask=None, sf_method: str = "auto", r_probe: float = 1.0,
                   r_shrink: float = 0.8, use_solvent: bool = True, complete: bool = False,
                   resolution_scale: bool | None = None) -> FmodelResult:
    """F_calc, bulk solvent, scales and σA for a model and its data (outside jit).

    Args:
        model: :class:`jaxrefine.io.model.Model` (hydrogens as read: keep or drop them when reading).
        refl: :class:`jaxrefine.io.reflections.Reflections`.
        f_calc: (n,) complex precomputed F_calc at ``refl.hkl`` (computed when None).
        f_mask: (n,) complex precomputed F_mask (computed when None).
        sf_method: "fft", "direct" or "auto" for F_calc (see :func:`model_f_calc`).
        r_probe, r_shrink: solvent-mask radii (Å).
        use_solvent: False: no bulk solvent (k_sol = 0).
        complete: compute F_calc and F_mask on every unique reflection to the data's limits
            (one structure-factor call), for map coefficients with fill-in (:func:`fmodel_maps`).
        resolution_scale: fit k_iso(s²); None: as refinement does (:func:`resolution_scale_for`).
    """
    t = {}
    crystal = refl.crystal
    hkl, full = refl.hkl, None
    if complete and f_calc is None and f_mask is None:
        hkl, obs_pos = complete_set(refl)
    t0 = time.perf_counter()
    if f_calc is None:
        f_calc = model_f_calc(model, crystal, hkl, sf_method)
    t["f_calc"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    shape, frac_solvent = (), float("nan")
    if f_mask is None and use_solvent:
        f_mask, shape, frac_solvent = model_f_mask(model, crystal, hkl, refl.d_min, r_probe, r_shrink)
    if f_mask is None:
        f_mask = np.zeros_like(f_calc)
    if hkl is not refl.hkl:
        full = (hkl, np.asarray(f_calc), np.asarray(f_mask), obs_pos)
        f_calc, f_mask = full[1][obs_pos], full[2][obs_pos]
    t["f_mask"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s_cart = reciprocal_vectors(refl.hkl, crystal)
    use, which = choose_sigma_a_set(refl.free)
    scales, fm, sig_a = fit_scales_and_sigma_a(
        refl.f_obs, refl.sig_f_obs, f_calc, f_mask, s_cart, ~np.asarray(refl.free, bool), use, sigma_a_bins(refl.d, use),
        refl.centric, refl.epsilon, crystal, use_solvent=use_solvent,
        resolution_scale=resolution_scale_for(refl.d_min) if resolution_scale is None else resolution_scale)
    fm = np.asarray(fm)
    t["scales_sigma_a"] = time.perf_counter() - t0
    return FmodelResult(
        f_calc=np.asarray(f_calc), f_mask=np.asarray(f_mask), f_model=fm, s_cart=s_cart, scales=scales,
        sigma_a=sig_a, sigma_a_set=which, mask_grid_shape=shape, solvent_fraction=frac_solvent, timings=t,
        complete=full,
    )


def scales_summary(scales: Scales) -> dict:
    """Plain-float view of :class:`Scales`: k_overall, B_iso (trace/3) and the anisotropic remainder."""
    b = np.asarray(scales.b_aniso, float)
    b_iso = float(b[:3].mean())
    return {
        "k_overall": float(scales.k_overall),
        "b_iso_overall": b_iso,
        "b_cart": b.tolist(),
        "b_aniso": (b - np.array([b_iso, b_iso, b_iso, 0, 0, 0])).tolist(),
        "k_sol": float(scales.k_sol),
        "b_sol": float(scales.b_sol),
    }


def fmodel_statistics(model, refl, n_bins: int = 10, result: FmodelResult | None = None, **kwargs) -> dict:
    """What ``jaxrefine rfactors`` reports: R-work/R-free overall and per bin, scales, σA.

    Args:
        model, refl: as for :func:`compute_fmodel`.
        n_bins: resolution bins of the table.
        result: a precomputed :class:`FmodelResult` (computed when None; kwargs go to
            :func:`compute_fmodel`).

    Returns:
        dict with r_work, r_free, n_work, n_free, cc_work, cc_free, bins (table), k_sol, b_sol,
        k_overall, b_iso_overall, b_cart, b_aniso, r_work_no_solvent_best_k (R of k|F_calc| with
        the analytic scale), sigma_a (per-bin D, S), solvent_fraction, timings.
    """
    res = result if result is not None else compute_fmodel(model, refl, **kwargs)
    out = r_factors(refl.f_obs, res.f_model, refl.free, refl.d, n_bins=n_bins)
    out.update(scales_summary(res.scales))
    work = ~np.asarray(refl.free, bool)
    out["r_work_fcalc_best_k"] = r_factor_best_scale(refl.f_obs, res.f_calc, work)
    out["r_free_fcalc_best_k"] = r_factor_best_scale(refl.f_obs, res.f_calc, ~work)
    out["d_min"], out["d_max"] = refl.d_min, refl.d_max
    out["n_atoms"] = int(model.n_atoms) if model is not None else None
    out["solvent_fraction"] = res.solvent_fraction
    out["mask_grid"] = list(res.mask_grid_shape)
    out["sigma_a"] = {"set": res.sigma_a_set, "d": res.sigma_a.bin_d.tolist(), "s": res.sigma_a.bin_s.tolist()}
    out["timings"] = {k: round(v, 3) for k, v in res.timings.items()}
    return out


def _expand_bins(sigma_a: SigmaA, d_obs, d_new) -> np.ndarray:
    """Bin of each new reflection: the bin of the observed reflection nearest in d."""
    d_obs = np.asarray(d_obs, float)
    order = np.argsort(d_obs)
    pos = np.clip(np.searchsorted(d_obs[order], d_new), 0, len(d_obs) - 1)
    return np.asarray(sigma_a.bins)[order[pos]]


def fmodel_maps(model, refl, result: FmodelResult, fill_missing: bool = True, sf_method: str = "auto"):
    """σA-weighted 2mFo−DFc and mFo−DFc coefficients for a model and its data.

    With ``fill_missing`` the coefficients cover every unique reflection between the data's
    d_max and d_min; unobserved ones get D·F_model (2mFo−DFc) and 0 (mFo−DFc).

    Returns:
        (hkl (m, 3) int, two_fofc (m,) complex, fofc (m,) complex).
    """
    from ..core.crystal import d_spacing
    from ..xray.maps import map_coefficients

    crystal = refl.crystal
    sig_a = result.sigma_a
    if not fill_missing:
        two, diff = map_coefficients(refl.f_obs, result.f_model, sig_a, refl.centric, refl.epsilon)
        return refl.hkl, np.asarray(two), np.asarray(diff)
    from ..core.crystal import centric_flags, epsilon_factors

    if result.complete is not None:
        hkl_all, f_calc, f_mask, obs_pos = result.complete
    else:
        hkl_all, obs_pos = complete_set(refl)
    d_all = d_spacing(hkl_all, crystal)
    observed = np.zeros(len(hkl_all), bool)
    observed[obs_pos] = True
    new = ~observed
    f_obs = np.zeros(len(hkl_all))
    f_obs[obs_pos] = refl.f_obs
    if result.complete is None:
        f_calc = np.zeros(len(hkl_all), complex)
        f_mask = np.zeros(len(hkl_all), complex)
        f_calc[obs_pos], f_mask[obs_pos] = result.f_calc, result.f_mask
        if new.any():
            f_calc[new] = model_f_calc(model, crystal, hkl_all[new], sf_method)
            if np.any(result.f_mask != 0):
                f_mask[new] = model_f_mask(model, crystal, hkl_all[new], refl.d_min)[0]
    fm = f_model(f_calc, f_mask, reciprocal_vectors(hkl_all, crystal), jax.tree_util.tree_map(np.asarray, result.scales))
    bins = np.zeros(len(hkl_all), np.int32)
    bins[obs_pos] = np.asarray(sig_a.bins)
    bins[new] = _expand_bins(sig_a, refl.d, d_all[new])
    sig_all = SigmaA(d=jnp.asarray(sig_a.bin_d[bins]), s=jnp.asarray(sig_a.bin_s[bins]), bins=bins,
                     bin_d=sig_a.bin_d, bin_s=sig_a.bin_s)
    two, diff = map_coefficients(f_obs, fm, sig_all, centric_flags(hkl_all, crystal), epsilon_factors(hkl_all, crystal),
                                 observed=observed)
    return hkl_all, np.asarray(two), np.asarray(diff)
