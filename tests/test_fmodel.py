"""F_model: bulk solvent, scaling, R-factors, LS/ML targets, σA and maps.

References: closed forms (Rice / Woolfson distributions from scipy.stats), finite differences in
float64, gemmi (solvent mask, F of a grid), servalcat's R-factors of the deposited models
(shared data README, "start" column) and the deposited R values.
"""
from __future__ import annotations

import json

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATASETS, dataset_paths
from jax.test_util import check_grads
from scipy import stats as sps

from jaxrefine.core.crystal import d_spacing
from jaxrefine.io.crystal_io import crystal_from_gemmi
from jaxrefine.xray.fmodel import f_model
from jaxrefine.xray.scaling import Scales, fit_scales, reciprocal_vectors
from jaxrefine.xray.maps import map_coefficients
from jaxrefine.xray.scaling import aniso_basis
from jaxrefine.xray.stats import r_factor_best_scale, r_factors
from jaxrefine.xray.targets import SigmaA, estimate_sigma_a, ls_amplitude_target, ml_amplitude_nll, ml_amplitude_target, sigma_a_bins

# ------------------------------------------------------------------------------ tolerances
TOL_CLOSED_FORM = 1e-10  # float64 evaluation of the same density: rounding only
TOL_FLOAT32 = 1e-4  # float32 vs float64 ML value/gradient (rounding of O(1e4) amplitudes)
TOL_GRAD = 1e-6  # check_grads (central differences, float64)
TOL_SCALE_PARAM = 0.02  # noise-free synthetic data: the fit should recover k, k_sol to 2%
TOL_SCALE_B = 0.5  # Å², B_sol and B_cart on noise-free data
TOL_SIGMAA = 0.05  # relative, D and S from 20000 simulated reflections per bin (sampling error ~1-2%)
TOL_VS_SERVALCAT = 0.02  # the check: R within 0.02 of servalcat's on the same model and data
TOL_VS_DEPOSITED = 0.03  # the check against the deposited R (unless servalcat is farther, see below)
MASK_MISMATCH = 2e-3  # fraction of grid points where the ASU-with-symmetry mask and the P1-expanded mask differ (rounding at the probe surface)
TOL_REGRESSION = 0.005  # R may not rise above the recorded jaxrefine value by more than this (improvements pass)
RIDING_R_TOL = 0.002  # R-free with library-placed riding hydrogens vs with the deposited ones (4xof)
PEAK_SIGMA = 3.0  # mFo-DFc peak at removed atoms, in map r.m.s.

# R-work / R-free: deposited (model header); servalcat 0.4.142 refine_xtal_norefmac --ncycle 0 (shared data
# README, "start"; servalcat adds riding hydrogens to every model by default; 1l2h: servalcat's R1 on
# intensities with I > 2σ); and jaxrefine rfactors, measured 2026-11-25 (model as read, so 4xof keeps its
# riding H; FFT F_calc; gemmi REFMAC-radii mask; k_overall, B_cart, k_sol, B_sol and k_iso(s²) fitted on
# the work set; 1va7 and 5kzb remeasured 2026-12-01 without k_iso, which F_model fits only below 2.5 Å
# since then, as refinement does: before 0.260/0.291 and 0.214/0.248). Only the first two columns are used
# by the checks; the third shows a regression.
# Also measured: servalcat --hydrogen no: 5e5z 0.245/0.201, 4xof 0.193/0.220, 1l2h 0.252/0.273,
# 5orl 0.213/0.245, 4iid 0.157/0.208, 1va7 0.261/0.293, 5kzb 0.215/0.249; jaxrefine on 4xof with its
# hydrogens removed: 0.153/0.188.
R_TABLE = {
    #        deposited        servalcat start   jaxrefine
    "5e5z": ((0.167, 0.198), (0.227, 0.238), (0.175, 0.240)),
    "4xof": ((0.137, 0.171), (0.182, 0.198), (0.140, 0.170)),
    "1l2h": ((0.154, 0.193), (0.246, 0.271), (0.254, 0.277)),
    "5orl": ((0.205, 0.238), (0.209, 0.243), (0.208, 0.239)),
    "4iid": ((0.155, 0.207), (0.159, 0.206), (0.154, 0.206)),
    "1va7": ((0.236, 0.280), (0.259, 0.301), (0.262, 0.293)),
    "5kzb": ((0.202, 0.249), (0.213, 0.255), (0.216, 0.250)),
}
LABIN = {"1va7": "FOBS,SIGFOBS,R-free-flags", "5kzb": "FOBS,SIGFOBS,R-free-flags", "1l2h": "IMEAN,SIGIMEAN,FreeR_flag",
         "4xof": "FP,SIGFP,FreeR_flag"}


def _crystal(cell, sg):
    return crystal_from_gemmi(gemmi.UnitCell(*cell), gemmi.SpaceGroup(sg))


# ------------------------------------------------------------------------------ anisotropic scale
@pytest.mark.parametrize(
    "cell, sg, n_par",
    [
        ((30, 40, 50, 70, 80, 95), "P 1", 6),
        ((30, 40, 50, 90, 101, 90), "P 1 21 1", 4),
        ((30, 40, 50, 90, 90, 90), "P 21 21 21", 3),
        ((50, 50, 70, 90, 90, 90), "P 43", 2),
        ((80, 80, 170, 90, 90, 120), "P 61 2 2", 2),
        ((60, 60, 60, 90, 90, 90), "P 21 3", 1),
    ],
)
def test_aniso_basis_counts_and_invariance(cell, sg, n_par):
    """The number of free B_cart components per crystal system (Grosse-Kunstleve & Adams 2002, Table 1),
    and every basis tensor is invariant under the point group."""
    cr = _crystal(cell, sg)
    basis = aniso_basis(cr)
    assert basis.shape == (n_par, 6)
    for b in basis:
        m = np.array([[b[0], b[3], b[4]], [b[3], b[1], b[5]], [b[4], b[5], b[2]]])
        for r in cr.rot:
            rc = cr.orth @ r @ cr.frac
            np.testing.assert_allclose(rc @ m @ rc.T, m, atol=1e-9)


def _synthetic(n=3000, seed=0, sg="P 21 21 21", cell=(30, 40, 50, 90, 90, 90)):
    """Random hkl with an F_calc of Wilson-like falloff and an F_mask that is strong at low resolution."""
    rng = np.random.default_rng(seed)
    cr = _crystal(cell, sg)
    hkl = rng.integers(-12, 13, size=(n, 3))
    hkl = hkl[np.any(hkl != 0, axis=1)]
    s2 = 1 / d_spacing(hkl, cr) ** 2
    f_calc = (rng.normal(size=len(hkl)) + 1j * rng.normal(size=len(hkl))) * 100 * np.exp(-10 * s2 / 4)
    f_mask = (rng.normal(size=len(hkl)) + 1j * rng.normal(size=len(hkl))) * 300 * np.exp(-200 * s2 / 4)
    return cr, hkl, f_calc, f_mask


def test_fit_scales_recovers_known_parameters():
    cr, hkl, f_calc, f_mask = _synthetic()
    s = reciprocal_vectors(hkl, cr)
    true = Scales(k_overall=jnp.asarray(0.8), b_aniso=jnp.asarray([3.0, -2.0, 5.0, 0, 0, 0]), k_sol=jnp.asarray(0.38),
                  b_sol=jnp.asarray(52.0))
    f_obs = np.abs(np.asarray(f_model(f_calc, f_mask, s, true)))
    work = np.ones(len(hkl), bool)
    fit = fit_scales(f_obs, f_calc, f_mask, s, work, cr)
    assert abs(float(fit.k_overall) / 0.8 - 1) < TOL_SCALE_PARAM
    assert abs(float(fit.k_sol) / 0.38 - 1) < TOL_SCALE_PARAM
    assert abs(float(fit.b_sol) - 52.0) < TOL_SCALE_B
    np.testing.assert_allclose(np.asarray(fit.b_aniso), [3.0, -2.0, 5.0, 0, 0, 0], atol=TOL_SCALE_B)
    fm = f_model(f_calc, f_mask, s, fit)
    assert r_factors(f_obs, fm, ~work)["r_work"] < 1e-3


LM_JACOBIAN_RTOL = 1e-6  # analytic Jacobian of the scale fit against float64 central differences (step 1e-6 rel.)


def test_scale_fit_residuals_are_f_models_and_their_jacobian_is_exact():
    """The joint scale fit's residuals (numpy float64) are F_obs − k_iso |F_model| of the Scales that fit_scales
    returns for the same x = [k, p, k_sol, B_sol], and their analytic Jacobian agrees with central differences."""
    from jaxrefine.xray.scaling import _lm_pieces, _lm_residuals, _ScaleFitData, aniso_quadratic

    cr, hkl, f_calc, f_mask = _synthetic(n=800, seed=2)
    s = reciprocal_vectors(hkl, cr)
    s2, q, basis = np.sum(s**2, axis=1), np.asarray(aniso_quadratic(s)), aniso_basis(cr)
    rng = np.random.default_rng(3)
    mult = 1 + 0.1 * rng.random(len(hkl))
    f_obs = np.abs(f_calc) * (1 + 0.2 * rng.random(len(hkl)))
    data = _ScaleFitData(f_obs, f_calc, f_mask, s2, q @ basis.T, mult)
    x = np.concatenate([[0.9], rng.normal(size=basis.shape[0]) * 3, [0.35, 45.0]])
    scales = Scales(k_overall=np.float64(x[0]), b_aniso=basis.T @ x[1:-2], k_sol=np.float64(x[-2]), b_sol=np.float64(x[-1]))
    np.testing.assert_allclose(_lm_residuals(x, data), f_obs - mult * np.abs(f_model(f_calc, f_mask, s, scales)), rtol=1e-12,
                               atol=1e-9 * f_obs.max())
    r, jac = _lm_pieces(x, data)
    np.testing.assert_array_equal(r, _lm_residuals(x, data))
    fd = np.empty_like(jac)
    for j in range(len(x)):
        h = 1e-6 * max(abs(x[j]), 1.0)
        up, down = x.copy(), x.copy()
        up[j] += h
        down[j] -= h
        fd[:, j] = (_lm_residuals(up, data) - _lm_residuals(down, data)) / (2 * h)
    np.testing.assert_allclose(jac, fd, rtol=LM_JACOBIAN_RTOL, atol=LM_JACOBIAN_RTOL * np.abs(fd).max())


def test_compiled_solvent_grid_search_picks_the_float64_loops_point():
    """The (k_sol, B_sol) grid search, scored by one compiled program and its best points re-scored in float64
    (the path for 20k or more work reflections), returns the point (and its log-linear fit) that a float64 loop
    over every grid point picks."""
    from jaxrefine.xray.scaling import B_SOL_GRID, K_SOL_GRID, _grid_point, _loglinear_design, _solvent_grid_search
    from jaxrefine.xray.scaling import aniso_basis, aniso_quadratic

    cr, hkl, f_calc, f_mask = _synthetic(n=6000, seed=4)
    s = reciprocal_vectors(hkl, cr)
    true = Scales(k_overall=jnp.asarray(0.8), b_aniso=jnp.asarray([3.0, -2.0, 5.0, 0, 0, 0]), k_sol=jnp.asarray(0.33),
                  b_sol=jnp.asarray(47.0))
    rng = np.random.default_rng(5)
    f_obs = np.abs(np.asarray(f_model(f_calc, f_mask, s, true))) * (1 + 0.1 * rng.normal(size=len(hkl)))
    f_obs = np.abs(f_obs)
    s2 = np.sum(s**2, axis=1)
    q, basis = np.asarray(aniso_quadratic(s)), aniso_basis(cr)
    fc2, cross, fm2 = np.abs(f_calc) ** 2, 2 * (f_calc * np.conj(f_mask)).real, np.abs(f_mask) ** 2
    design = _loglinear_design(q, basis)
    pinv = np.linalg.pinv(design)
    scored = [(_grid_point(f_obs, fc2, cross, fm2, s2, design, pinv, k, b)[0], k, b) for b in B_SOL_GRID for k in K_SOL_GRID]
    r_best, k_best, b_best = min(scored, key=lambda t: t[0])
    x = _solvent_grid_search(f_obs, f_calc, f_mask, q, s2, basis, K_SOL_GRID, B_SOL_GRID, compiled=True)
    assert (x[-2], x[-1]) == (k_best, b_best)
    _, p, kk = _grid_point(f_obs, fc2, cross, fm2, s2, design, pinv, k_best, b_best)
    assert x[0] == pytest.approx(np.exp(p[0]) * kk, rel=1e-12)


def test_k_iso_fit_matches_dense_least_squares_and_recovers_a_linear_scale():
    """fit_k_iso (normal equations of the two-non-zero hat design) equals numpy's lstsq of the dense design, and
    a scale linear in s² between its nodes is recovered exactly."""
    from jaxrefine.xray.scaling import _hat_interpolate, fit_k_iso

    rng = np.random.default_rng(7)
    s2 = rng.random(12000) * 0.19
    f_amp = np.abs(rng.normal(size=s2.size)) * 100 + 1
    f_obs = f_amp * (1.1 + 0.3 * s2) * (1 + 0.1 * rng.normal(size=s2.size))
    nodes, vals = fit_k_iso(f_obs, f_amp, s2)
    x = np.clip(s2, nodes[0], nodes[-1])
    dense = np.stack([np.interp(x, nodes, np.eye(len(nodes))[i]) for i in range(len(nodes))], axis=1)  # hat functions
    ref, *_ = np.linalg.lstsq(dense * f_amp[:, None], f_obs, rcond=None)
    np.testing.assert_allclose(vals, ref, rtol=1e-10)
    exact = f_amp * np.interp(x, nodes, 1.0 + np.arange(len(nodes)) * 0.05)
    _, vals2 = fit_k_iso(exact, f_amp, s2)
    np.testing.assert_allclose(vals2, 1.0 + np.arange(len(nodes)) * 0.05, rtol=1e-10)
    np.testing.assert_allclose(_hat_interpolate(s2, nodes, vals2), exact / f_amp, rtol=1e-10)


# ------------------------------------------------------------------------------ ML target: closed forms
def test_ml_acentric_is_rice_and_centric_is_woolfson():
    """−log P against scipy.stats.rice (acentric, per-component variance Σ/2) and foldnorm (centric, variance Σ)."""
    fo = np.array([0.5, 3.0, 10.0, 40.0, 120.0])
    fc = np.array([2.0, 3.5, 9.0, 60.0, 100.0])
    d, s, eps, sig = 0.9, 30.0, np.array([1, 2, 1, 1, 4]), np.array([0.0, 1.0, 2.0, 0.5, 3.0])
    nu = d * fc
    sum_a = eps * s + 2 * sig**2
    sum_c = eps * s + sig**2
    ref_a = -sps.rice.logpdf(fo, nu / np.sqrt(sum_a / 2), scale=np.sqrt(sum_a / 2))
    ref_c = -sps.foldnorm.logpdf(fo, nu / np.sqrt(sum_c), scale=np.sqrt(sum_c))
    for cen, ref in ((False, ref_a), (True, ref_c)):
        got = ml_amplitude_nll(fo, sig, fc, d, s, np.full(5, cen), eps)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=TOL_CLOSED_FORM * 1e3, atol=TOL_CLOSED_FORM)


def test_ml_target_large_arguments_float32_matches_float64():
    """I0 and cosh of arguments ~1e6 (strong reflections, small S): finite, and float32 agrees with float64."""
    out = {}
    for dt, ct in ((jnp.float32, jnp.complex64), (jnp.float64, jnp.complex128)):
        fo = jnp.asarray([3000.0, 5000.0, 5000.0, 20.0], dt)
        f = jnp.asarray([2900.0 + 100j, 0.0 + 5100j, 4990.0 - 5j, 25.0 + 1j]).astype(ct)
        sa = SigmaA(d=jnp.asarray([1.0] * 4, dt), s=jnp.asarray([10.0] * 4, dt), bins=None, bin_d=None, bin_s=None)
        for cen in (False, True):
            v, g = jax.value_and_grad(lambda x: ml_amplitude_target(fo, jnp.full(4, 0.5, dt), x, sa, jnp.array([cen] * 4),
                                                                      jnp.ones(4, dt), jnp.ones(4, dt)))(f)
            assert np.isfinite(float(v)) and np.all(np.isfinite(np.asarray(g)))
            out[dt, cen] = (float(v), np.asarray(g, np.complex128))
    for cen in (False, True):
        v32, g32 = out[jnp.float32, cen]
        v64, g64 = out[jnp.float64, cen]
        assert abs(v32 - v64) < TOL_FLOAT32 * abs(v64)
        np.testing.assert_allclose(g32, g64, rtol=TOL_FLOAT32, atol=TOL_FLOAT32 * np.abs(g64).max())


# ------------------------------------------------------------------------------ gradients
def _small_problem(seed=1, n=40):
    rng = np.random.default_rng(seed)
    cr, hkl, f_calc, f_mask = _synthetic(n=n, seed=seed)
    s = reciprocal_vectors(hkl, cr)
    n = len(hkl)
    fo = np.abs(f_calc + 0.3 * f_mask) * (1 + 0.1 * rng.normal(size=n)) + 1.0
    sig = 0.05 * fo + 0.5
    cen = rng.random(n) < 0.3
    eps = rng.choice([1, 2], size=n).astype(float)
    mask = (rng.random(n) < 0.8).astype(float)
    sa = SigmaA(d=jnp.asarray(0.7 + 0.2 * rng.random(n)), s=jnp.asarray(50 + 20 * rng.random(n)), bins=None, bin_d=None,
                bin_s=None)
    return cr, s, f_calc, f_mask, fo, sig, cen, eps, mask, sa


def test_ml_and_ls_gradients_wrt_f_model():
    _, _, f_calc, f_mask, fo, sig, cen, eps, mask, sa = _small_problem()
    fm0 = f_calc + 0.3 * f_mask

    def ml(re, im):
        return ml_amplitude_target(fo, sig, re + 1j * im, sa, cen, eps, mask)

    def ls(re, im):
        return ls_amplitude_target(fo, sig, re + 1j * im, mask)

    for fun in (ml, ls):
        check_grads(fun, (jnp.asarray(fm0.real), jnp.asarray(fm0.imag)), order=1, modes=["rev"], atol=TOL_GRAD, rtol=TOL_GRAD)


def test_ml_and_ls_gradients_wrt_scales():
    _, s, f_calc, f_mask, fo, sig, cen, eps, mask, sa = _small_problem(seed=2)

    def target(kind):
        def fun(k_sol, b_sol, k, b6):
            fm = f_model(f_calc, f_mask, s, Scales(k, b6, k_sol, b_sol))
            if kind == "ml":
                return ml_amplitude_target(fo, sig, fm, sa, cen, eps, mask)
            return ls_amplitude_target(fo, sig, fm, mask, scale=1.0)
        return fun

    x0 = (jnp.asarray(0.35), jnp.asarray(45.0), jnp.asarray(0.9), jnp.asarray([1.0, -0.5, 2.0, 0.0, 0.0, 0.0]))
    for kind in ("ml", "ls"):
        check_grads(target(kind), x0, order=1, modes=["rev"], atol=TOL_GRAD, rtol=TOL_GRAD, eps=1e-4)


def test_ml_target_jit_compiles_once():
    _, _, f_calc, f_mask, fo, sig, cen, eps, mask, sa = _small_problem(seed=3)
    traces = []

    @jax.jit
    def f(fm, sa_d, sa_s):
        traces.append(1)
        return ml_amplitude_target(fo, sig, fm, SigmaA(sa_d, sa_s, None, None, None), cen, eps, mask)

    f(jnp.asarray(f_calc), sa.d, sa.s)
    f(jnp.asarray(f_calc * 1.1), sa.d * 0.9, sa.s * 1.2)
    assert len(traces) == 1


def test_ml_target_on_the_host_equals_the_traced_one():
    """ml_amplitude_target with numpy arguments (the w_A scan's free likelihood, engine._free_nll) runs in numpy with
    scipy's Bessel function, compiles nothing, and equals the jitted target in float64."""
    from jaxrefine.core.cache import compile_counters, compile_delta

    _, _, f_calc, f_mask, fo, sig, cen, eps, mask, sa = _small_problem(seed=3)
    host_sa = SigmaA(np.asarray(sa.d, float), np.asarray(sa.s, float), None, None, None)
    before = compile_counters()
    host = ml_amplitude_target(np.asarray(fo, float), np.asarray(sig, float), np.asarray(f_calc, complex), host_sa,
                               np.asarray(cen), np.asarray(eps, float), np.asarray(mask))
    assert compile_delta(before)["total_s"] == 0.0 and isinstance(host, np.floating)
    traced = jax.jit(ml_amplitude_target)(jnp.asarray(fo, jnp.float64), jnp.asarray(sig, jnp.float64),
                                          jnp.asarray(f_calc, jnp.complex128),
                                          SigmaA(jnp.asarray(sa.d, jnp.float64), jnp.asarray(sa.s, jnp.float64),
                                                 None, None, None), jnp.asarray(cen), jnp.asarray(eps, jnp.float64),
                                          jnp.asarray(mask))
    assert float(host) == pytest.approx(float(traced), rel=1e-12)


# ------------------------------------------------------------------------------ σA estimation
def test_estimate_sigma_a_recovers_simulated_d_and_s():
    """Fo = |D Fc + error| with complex Gaussian error of variance εS (acentric) / real (centric)."""
    rng = np.random.default_rng(5)
    n = 40000
    d_true = np.where(np.arange(n) < n // 2, 0.9, 0.6)
    s_true = np.where(np.arange(n) < n // 2, 200.0, 80.0)
    dspacing = np.where(np.arange(n) < n // 2, 5.0, 2.0) + 0.01 * rng.random(n)
    cen = rng.random(n) < 0.2
    eps = np.ones(n)
    fc = (rng.normal(size=n) + 1j * rng.normal(size=n)) * 20
    fc = np.where(cen, fc.real + 0j, fc)
    err = np.where(cen, rng.normal(size=n) * np.sqrt(s_true), (rng.normal(size=n) + 1j * rng.normal(size=n)) * np.sqrt(s_true / 2))
    fo = np.abs(d_true * fc + err)
    use = np.ones(n, bool)
    bins = sigma_a_bins(dspacing, use, min_per_bin=n // 2)
    sa = estimate_sigma_a(fo, fc, use, bins, cen, eps)
    assert len(sa.bin_d) == 2
    np.testing.assert_allclose(sa.bin_d, [0.9, 0.6], rtol=TOL_SIGMAA)
    np.testing.assert_allclose(sa.bin_s, [200.0, 80.0], rtol=TOL_SIGMAA)


def test_sigma_a_fit_reaches_the_minimum_an_independent_optimiser_finds():
    """estimate_sigma_a's damped Newton steps per bin end at a −log-likelihood no higher than scipy's L-BFGS-B
    (tight tolerances, from a neutral start) reaches over the same 40 parameters: 20 bins whose D and S differ."""
    from scipy.optimize import minimize

    from jaxrefine.xray.targets import ml_amplitude_nll

    rng = np.random.default_rng(11)
    n, nb = 2000, 20
    which = np.repeat(np.arange(nb), n // nb)
    d_true, s_true = np.linspace(0.95, 0.3, nb)[which], np.linspace(50.0, 400.0, nb)[which]
    dspacing = np.linspace(6.0, 1.5, n)
    cen = rng.random(n) < 0.1
    eps = np.where(rng.random(n) < 0.05, 2.0, 1.0)
    sig = 0.5 + rng.random(n)
    fc = (rng.normal(size=n) + 1j * rng.normal(size=n)) * 15
    fc = np.where(cen, fc.real + 0j, fc)
    err = np.where(cen, rng.normal(size=n) * np.sqrt(eps * s_true),
                   (rng.normal(size=n) + 1j * rng.normal(size=n)) * np.sqrt(eps * s_true / 2))
    fo = np.abs(d_true * fc + err)
    use = np.ones(n, bool)
    bins = sigma_a_bins(dspacing, use)
    assert bins.max() + 1 == nb
    from jaxrefine.core.cache import compile_counters, compile_delta

    before = compile_counters()
    sa = estimate_sigma_a(fo, fc, use, bins, cen, eps, sig)
    assert compile_delta(before)["total_s"] == 0.0  # numpy on the host: no program to compile or load

    def total(p):
        p = p.reshape(nb, 2)
        return jnp.sum(ml_amplitude_nll(fo, sig, np.abs(fc), jnp.exp(p[bins, 0]), jnp.exp(p[bins, 1]), cen, eps))

    value_and_grad = jax.jit(jax.value_and_grad(total))

    def nll(p):
        v, g = value_and_grad(jnp.asarray(p, jnp.float32))
        return float(v), np.asarray(g, float)

    start = np.tile([np.log(0.5), np.log(np.mean(fo**2))], nb)
    ref = minimize(nll, start, jac=True, method="L-BFGS-B", options={"ftol": 1e-12, "gtol": 1e-7, "maxiter": 2000})
    got = nll(np.stack([np.log(sa.bin_d), np.log(sa.bin_s)], -1).ravel())[0]
    assert got <= ref.fun + 1e-5 * abs(ref.fun), (got, ref.fun)
    d_ref = np.exp(ref.x.reshape(nb, 2)[:, 0])
    firm = d_ref > 0.1  # where the likelihood pins D (a bin whose D drifts towards 0 sits on a flat valley floor)
    assert firm.sum() >= nb - 3
    np.testing.assert_allclose(sa.bin_d[firm], d_ref[firm], rtol=0.02)


# ------------------------------------------------------------------------------ statistics and maps
def test_r_factors_by_hand():
    fo = np.array([10.0, 20.0, 30.0, 40.0])
    fm = np.array([11.0, 18.0 + 0j, 30.0j, 44.0])
    free = np.array([False, False, True, True])
    r = r_factors(fo, fm, free, d=np.array([4.0, 3.0, 2.0, 1.0]), n_bins=2)
    assert r["r_work"] == pytest.approx(3.0 / 30.0)
    assert r["r_free"] == pytest.approx(4.0 / 70.0)
    assert (r["n_work"], r["n_free"]) == (2, 2)
    assert [(b["n_work"], b["n_free"]) for b in r["bins"]] == [(2, 0), (0, 2)]
    # best scale: fc = 2 fo exactly gives R = 0
    assert r_factor_best_scale(fo, 2 * fo) == pytest.approx(0.0, abs=1e-12)


def test_map_coefficients_formulas_and_fill_in():
    fo = np.array([10.0, 10.0, 5.0])
    fm = np.array([8.0 * np.exp(0.3j), 8.0 * np.exp(1.1j), 4.0 + 0j])
    cen = np.array([False, True, False])
    d, s = np.array([0.8, 0.8, 0.8]), np.array([20.0, 20.0, 20.0])
    sa = SigmaA(d=jnp.asarray(d), s=jnp.asarray(s), bins=None, bin_d=None, bin_s=None)
    two, diff = map_coefficients(fo, fm, sa, cen, np.ones(3), observed=np.array([True, True, False]))
    from scipy.special import i0e, i1e

    x_a = 2 * 10 * 0.8 * 8 / 20
    m_a = i1e(x_a) / i0e(x_a)
    m_c = np.tanh(10 * 0.8 * 8 / 20)
    np.testing.assert_allclose(two[0], (2 * m_a * 10 - 0.8 * 8) * np.exp(0.3j), rtol=1e-12)
    np.testing.assert_allclose(diff[0], (m_a * 10 - 0.8 * 8) * np.exp(0.3j), rtol=1e-12)
    np.testing.assert_allclose(two[1], m_c * 10 * np.exp(1.1j), rtol=1e-12)
    np.testing.assert_allclose(diff[1], (m_c * 10 - 0.8 * 8) * np.exp(1.1j), rtol=1e-12)
    np.testing.assert_allclose(two[2], 0.8 * fm[2], rtol=1e-12)  # missing: D·F_model
    assert diff[2] == 0


# ------------------------------------------------------------------------------ real data
def _load(pdb_id, hydrogens=True):
    from jaxrefine.io.model import read_model
    from jaxrefine.io.reflections import read_reflections

    model_path, data_path = dataset_paths(pdb_id)
    return read_model(model_path, hydrogens=hydrogens), read_reflections(data_path, labin=LABIN.get(pdb_id, "FP,SIGFP,FREE"), free_value=0)


def test_mask_symmetry_matches_p1_expansion():
    """Mask of the asymmetric unit with the space group (gemmi handles symmetry and cell edges) equals
    the mask of the explicitly expanded P1 model; F_mask by f_from_grid equals gemmi's transform."""
    from jaxrefine.io.mask import mask_grid_shape, solvent_mask
    from jaxrefine.xray.structure_factors import f_from_grid

    model, refl = _load("5kzb")
    cr = refl.crystal
    shape = mask_grid_shape(cr, 2.0, spacing=1.0)  # coarser than for F_mask: keeps the test fast
    m_sym = solvent_mask(model, cr, shape, island_min_volume=0)
    xyz = np.concatenate([cr.to_cart(cr.to_frac(model.xyz_cart) @ r.T + t) for r, t in zip(cr.rot, cr.trans)])
    n_ops = len(cr.rot)
    p1 = _crystal(cr.cell, "P 1")
    m_p1 = solvent_mask((xyz, np.tile(model.element, n_ops), np.tile(model.occ, n_ops)), p1, shape, island_min_volume=0)
    assert 0.3 < m_sym.mean() < 0.8
    assert np.mean(m_sym != m_p1) < MASK_MISMATCH
    # symmetry consistency of the grid: mask(R x + t) = mask(x)
    idx = np.random.default_rng(0).integers(0, shape, size=(20000, 3))
    frac = idx / np.asarray(shape)
    for r, t in zip(cr.rot, cr.trans):
        j = np.rint(((frac @ r.T + t) % 1.0) * np.asarray(shape)).astype(int) % np.asarray(shape)
        assert np.all(m_sym[j[:, 0], j[:, 1], j[:, 2]] == m_sym[idx[:, 0], idx[:, 1], idx[:, 2]])
    grid = gemmi.FloatGrid(m_sym.astype(np.float32))
    grid.set_unit_cell(gemmi.UnitCell(*cr.cell))
    hkl = refl.hkl[refl.d > 4.0]  # within the coarse grid's Nyquist limit
    ref = gemmi.transform_map_to_f_phi(grid).get_value_by_hkl(hkl)
    got = np.asarray(f_from_grid(jnp.asarray(m_sym), jnp.asarray(hkl), cr))
    np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())


def test_mask_equals_gemmis_float_grid_mask_at_refinement_spacing():
    """solvent_mask (gemmi's 8-bit grid) is the mask gemmi puts on a float grid, point for point, with the
    refinement's radii, island removal and grid (5kzb: 16 operators, 77 % solvent)."""
    from jaxrefine.io.crystal_io import gemmi_cell, gemmi_space_group
    from jaxrefine.io.mask import _gemmi_model, mask_grid_shape, solvent_mask

    model, refl = _load("5kzb", hydrogens=False)
    cr = refl.crystal
    shape = mask_grid_shape(cr, refl.d_min)
    ours = solvent_mask(model, cr, shape, r_probe=1.0, r_shrink=0.8)
    grid = gemmi.FloatGrid(*shape)
    grid.set_unit_cell(gemmi_cell(cr))
    grid.spacegroup = gemmi_space_group(cr)
    masker = gemmi.SolventMasker(gemmi.AtomicRadiiSet.Refmac)
    masker.rprobe, masker.rshrink, masker.island_min_volume = 1.0, 0.8, 50.0
    masker.put_mask_on_float_grid(grid, _gemmi_model(model))
    ref = np.array(grid, copy=False)
    assert ours.dtype == np.uint8 and ours.flags.c_contiguous and 0.6 < ours.mean() < 0.9
    assert np.array_equal(ours, ref.astype(np.uint8))


def r_check(pdb_id: str, r_work: float, r_free: float) -> None:
    """The issue's rule: within TOL_VS_SERVALCAT of servalcat, and within TOL_VS_DEPOSITED of the deposited
    values, except that where servalcat itself is farther than TOL_VS_DEPOSITED from the deposited values
    (the README explains why: SHELXL R1, TLS, ANISOU/altlocs), matching servalcat is the floor."""
    (dep_w, dep_f), (sv_w, sv_f), _ = R_TABLE[pdb_id]
    assert abs(r_work - sv_w) < TOL_VS_SERVALCAT or r_work < sv_w, (pdb_id, "R-work vs servalcat", r_work, sv_w)
    assert abs(r_free - sv_f) < TOL_VS_SERVALCAT or r_free < sv_f, (pdb_id, "R-free vs servalcat", r_free, sv_f)
    for ours, dep, sv, name in ((r_work, dep_w, sv_w, "R-work"), (r_free, dep_f, sv_f, "R-free")):
        if abs(sv - dep) <= TOL_VS_DEPOSITED:  # deposited value reachable: hold us to it
            assert abs(ours - dep) < TOL_VS_DEPOSITED, (pdb_id, name, "vs deposited", ours, dep)
        else:  # not reachable from these files: no worse than servalcat's distance to it
            assert abs(ours - dep) <= abs(sv - dep) + TOL_VS_SERVALCAT, (pdb_id, name, "vs deposited (servalcat floor)", ours, dep, sv)


@pytest.mark.slow
@pytest.mark.parametrize("pdb_id", DATASETS)
def test_r_factors_of_deposited_models(pdb_id):
    from jaxrefine.problem.fmodel import fmodel_statistics

    model, refl = _load(pdb_id)
    st = fmodel_statistics(model, refl)
    print(f"{pdb_id}: R-work {st['r_work']:.4f} R-free {st['r_free']:.4f} k_sol {st['k_sol']:.3f} B_sol {st['b_sol']:.1f}")
    r_check(pdb_id, st["r_work"], st["r_free"])
    ours_w, ours_f = R_TABLE[pdb_id][2]
    assert st["r_work"] < ours_w + TOL_REGRESSION and st["r_free"] < ours_f + TOL_REGRESSION, "regression vs recorded R"
    assert st["n_work"] + st["n_free"] == refl.n and st["n_free"] == refl.n_free
    assert sum(b["n_work"] for b in st["bins"]) == st["n_work"]
    assert 0.0 <= st["k_sol"] < 1.0 and 10.0 <= st["b_sol"] <= 300.0


def test_rfactors_riding_hydrogens_reproduce_the_deposited_ones(capsys):
    """``rfactors --riding-hydrogens`` scores a model with hydrogens placed from the monomer library, as servalcat's
    scoring adds them.  4xof (1.15 Å) was deposited with riding hydrogens (704 with positions): the library's
    726 give the same R-free within RIDING_R_TOL (measured 0.1702 against 0.1704), and both are far below the
    model without hydrogens (0.1875)."""
    from jaxrefine.cli import main
    from jaxrefine.problem.fmodel import fmodel_statistics

    from conftest import monomer_dir

    model_path, data_path = dataset_paths("4xof")
    model, refl = _load("4xof")
    deposited = fmodel_statistics(model, refl)
    bare = fmodel_statistics(*_load("4xof", hydrogens=False))
    capsys.readouterr()
    assert main(["-q", "rfactors", str(model_path), str(data_path), "--labin", LABIN["4xof"], "--free-value", "0",
                 "--riding-hydrogens", "--monlib", str(monomer_dir()), "--json"]) == 0
    out = capsys.readouterr().out
    riding = json.loads(out[out.index("{"):])
    assert abs(riding["r_free"] - deposited["r_free"]) < RIDING_R_TOL, (riding["r_free"], deposited["r_free"])
    assert riding["r_free"] < bare["r_free"] - 0.01 and riding["r_work"] < bare["r_work"] - 0.01


@pytest.mark.parametrize("pdb_id", ["5kzb"])  # (1l2h, 1.54 Å, k_iso in both: also within 1e-3; 14 s of CI)
def test_rfactors_reports_the_refinements_r(pdb_id):
    """``rfactors`` and the refinement fit one F_model (k_iso(s²) only below 2.5 Å): the R of the setup's
    starting state equals ``fmodel_statistics``' on the same model.  With k_iso in rfactors alone, 5kzb's
    deposited model scored 0.2140 / 0.2480 there against 0.2163 / 0.2504 in the refinement."""
    from jaxrefine.config import load_config
    from jaxrefine.problem import build_setup
    from jaxrefine.problem.fmodel import fmodel_statistics
    from jaxrefine.problem.problem import observed
    from jaxrefine.problem.xray_state import f_model_on_host

    from conftest import monomer_dir

    model, refl = _load(pdb_id, hydrogens=False)
    st = fmodel_statistics(model, refl)
    s = build_setup(None, None, load_config(None, [f"model.monlib={monomer_dir()}", "refine.adp=iso"]), model=model, refl=refl)
    x = s.problem.xray
    fo, fm, work = observed(x, x.f_obs, f_model_on_host(s.params, s.problem, s.state), x.work)  # without the pads
    keep = fo > 0
    ours = r_factors(fo[keep], fm[keep], ~work[keep])
    assert ours["r_work"] == pytest.approx(st["r_work"], abs=1e-3) and ours["r_free"] == pytest.approx(st["r_free"], abs=1e-3)


def test_r_check_rule():
    """The rule itself: deposited R reachable (5orl) -> 0.03; unreachable (1l2h) -> servalcat floor."""
    r_check("5orl", 0.215, 0.250)
    with pytest.raises(AssertionError):
        r_check("5orl", 0.240, 0.250)  # within 0.02 of servalcat's? no (0.031 off)
    r_check("1l2h", 0.25, 0.28)  # 0.10 above deposited but matches servalcat
    with pytest.raises(AssertionError):
        r_check("1l2h", 0.30, 0.32)


@pytest.mark.slow
def test_removed_ligand_gives_difference_peak(tmp_path):
    """5orl without ADP: mFo−DFc has a positive peak > 3σ at the removed atoms."""
    from jaxrefine.io.maps_io import map_from_coefficients
    from jaxrefine.problem.fmodel import compute_fmodel, fmodel_maps

    model, refl = _load("5orl")
    removed = model.res_name == "ADP"
    assert removed.sum() > 20
    part = model.subset(~removed)
    res = compute_fmodel(part, refl, complete=True)
    hkl, two, diff = fmodel_maps(part, refl, res)
    cr = refl.crystal
    values = map_from_coefficients(cr, hkl, diff)
    shape = np.asarray(values.shape)
    sigma = values.std()
    frac = cr.to_frac(model.xyz_cart[removed]) % 1.0
    idx = np.rint(frac * shape).astype(int) % shape
    at_atoms = values[idx[:, 0], idx[:, 1], idx[:, 2]] / sigma
    print("mFo-DFc at removed ADP atoms (sigma):", np.round(np.sort(at_atoms), 1))
    assert np.median(at_atoms) > PEAK_SIGMA, np.round(at_atoms, 1)
    # a control: at atoms kept in the model the difference map is flat
    kept = cr.to_frac(model.xyz_cart[~removed][:200]) % 1.0
    kidx = np.rint(kept * shape).astype(int) % shape
    assert abs(np.median(values[kidx[:, 0], kidx[:, 1], kidx[:, 2]] / sigma)) < 1.0


@pytest.mark.slow
def test_cli_rfactors_json_and_map_mtz(tmp_path, capsys):
    from jaxrefine.cli import main

    model_path, data_path = dataset_paths("5e5z")
    out = tmp_path / "maps.mtz"
    assert main(["rfactors", str(model_path), str(data_path), "--json", "--mtz-out", str(out), "--map-out", str(tmp_path / "m")]) == 0
    rep = json.loads(capsys.readouterr().out)
    for key in ("r_work", "r_free", "k_sol", "b_sol", "n_work", "n_free", "bins", "b_aniso", "k_overall", "cc_work"):
        assert key in rep
    assert rep["n_work"] == 385 and rep["n_free"] == 18
    r_check("5e5z", rep["r_work"], rep["r_free"])
    mtz = gemmi.read_mtz_file(str(out))
    labels = [c.label for c in mtz.columns]
    for lab in ("2FOFCWT", "PH2FOFCWT", "FOFCWT", "PHFOFCWT"):
        assert lab in labels
    assert mtz.spacegroup.number == 4
    # fill-in: the MTZ covers every reflection to d_min, more than the 403 observed
    assert mtz.nreflections >= 403
    m = gemmi.read_ccp4_map(str(tmp_path / "m_2fofc.ccp4"))
    assert np.array(m.grid).std() > 0


def test_sigma_a_fit_derivatives_in_closed_form_equal_jax_derivatives():
    """The σA fit's per-bin gradient and Hessian wrt (ln D, ln S), written out (targets._bin_derivatives), against JAX's
    derivatives of ml_amplitude_nll (forward over reverse) in float64: acentric and centric reflections, ε 1 and 2,
    measurement σ, and reflections with Fo = 0 or D|Fm| → 0 (the Bessel ratio's small-x limit)."""
    from jaxrefine.xray.targets import _bin_derivatives

    rng = np.random.default_rng(5)
    n, nb = 600, 6
    fo = rng.gamma(2.0, 40.0, n)
    fo[:5] = 0.0
    fm = fo * rng.uniform(0.3, 1.7, n) + 1.0
    fm[5:10] = 1e-9
    sig = 0.05 * fo + 0.5
    cen = rng.random(n) < 0.25
    eps = np.where(rng.random(n) < 0.1, 2.0, 1.0)
    bins = np.sort(rng.integers(0, nb, n)).astype(np.int32)
    onehot = (bins[:, None] == np.arange(nb)[None]).astype(float)
    p = np.stack([np.log(rng.uniform(0.3, 1.0, nb)), np.log(rng.uniform(200.0, 3000.0, nb))], -1)

    def total(ld, ls):
        return jnp.sum(ml_amplitude_nll(fo, sig, fm, jnp.exp(ld), jnp.exp(ls), cen, eps))

    # float64 (tests/conftest.py enables it)
    ld, ls = jnp.asarray(p[bins, 0]), jnp.asarray(p[bins, 1])
    grad = jax.grad(total, argnums=(0, 1))
    g_d, g_s = grad(ld, ls)
    _, (h_dd, h_sd) = jax.jvp(lambda a: grad(a, ls), (ld,), (jnp.ones_like(ld),))
    _, (h_ds, h_ss) = jax.jvp(lambda b: grad(ld, b), (ls,), (jnp.ones_like(ls),))
    want_g = np.asarray(jnp.stack([g_d, g_s]) @ onehot).T
    dd, ds, ss = np.asarray(jnp.stack([h_dd, 0.5 * (h_ds + h_sd), h_ss]) @ onehot)
    want_h = np.stack([np.stack([dd, ds], -1), np.stack([ds, ss], -1)], -2)
    g, h = _bin_derivatives(jnp.asarray(p), jnp.asarray(fo), jnp.asarray(sig), jnp.asarray(fm), jnp.asarray(cen),
                            jnp.asarray(eps), jnp.asarray(bins), jnp.asarray(onehot))
    assert g.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-9, atol=1e-9 * np.abs(want_g).max())
    np.testing.assert_allclose(np.asarray(h), want_h, rtol=1e-9, atol=1e-9 * np.abs(want_h).max())
    # the fit's own call: numpy arrays, scipy's Bessel functions (core.device.array_module)
    g_np, h_np = _bin_derivatives(p, fo, sig, fm, cen, eps, bins, onehot)
    assert isinstance(g_np, np.ndarray) and isinstance(h_np, np.ndarray)
    np.testing.assert_allclose(g_np, want_g, rtol=1e-9, atol=1e-9 * np.abs(want_g).max())
    np.testing.assert_allclose(h_np, want_h, rtol=1e-9, atol=1e-9 * np.abs(want_h).max())
