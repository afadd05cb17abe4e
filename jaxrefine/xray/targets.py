"""X-ray targets on amplitudes: σ-weighted least squares and maximum likelihood.

Maximum likelihood (Read 1986, Acta Cryst. A42, 140; Lunin & Urzhumtsev 1984, Acta Cryst. A40,
269; Pannu & Read 1996, Acta Cryst. A52, 659), with F_model already scaled to F_obs and the
per-bin parameters D (α) and S (β):

  acentric (Rice):     P(Fo) = 2Fo/Σ · exp(−(Fo² + D²|Fm|²)/Σ) · I0(2 D Fo |Fm| / Σ),   Σ = εS + 2σ²
  centric (Woolfson):  P(Fo) = √(2/(πΣ)) · exp(−(Fo² + D²|Fm|²)/(2Σ)) · cosh(D Fo |Fm| / Σ),  Σ = εS + σ²

The measurement error σ of Fo is folded into the variance as in REFMAC and servalcat
(Murshudov et al. 1997, Acta Cryst. D53, 240; Yamashita et al. 2021, Acta Cryst. D77, 1282).

Normalisation: both targets return a sum over the masked (work) reflections of a negative
log-likelihood (the LS target is ½ Σ w (Fo − k|Fm|)², the −log-likelihood of Gaussian errors up
to a constant), so their gradients have the magnitude of the usual X-ray targets.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core.device import array_module, on_device, special_module

MIN_PER_BIN = 50  # reflections per σA bin (servalcat's default for the test set)
MAX_BINS = 20
_TINY = 1e-12  # added to |F|² so that |F| is differentiable at F = 0
# σA fit (estimate_sigma_a): D and S per bin by damped Newton steps on ln D, ln S (_fit_bins) from a least-squares start
D_START_RANGE = (0.05, 2.0)  # the LS start of D is clipped here: D is a fraction of F_model that is correct (≤ ~1)
S_START_FLOOR = 0.05  # the start of S is at least this × mean(Fo²/ε): a perfect-looking bin still has model error
LN_D_BOUNDS = (-6.0, 1.0)  # ln D: D in [0.0025, 2.7]
LN_S_BOUNDS = (-20.0, 30.0)  # ln S: wide; S is in electrons², its scale depends on the cell content


class SigmaA(NamedTuple):
    """Per-reflection ML parameters expanded from resolution bins.

    Attributes:
        d: (n,) D (α): fraction of F_model that is correct, per reflection.
        s: (n,) S (β): variance of the model error per unit ε (electrons²).
        bins: (n,) int bin of each reflection.
        bin_d, bin_s: (n_bins,) the fitted values per bin.
    """

    d: jax.Array
    s: jax.Array
    bins: np.ndarray
    bin_d: np.ndarray
    bin_s: np.ndarray


def _abs(f):
    xp = array_module(f)
    f = xp.asarray(f)
    if xp.iscomplexobj(f):
        return xp.sqrt(f.real**2 + f.imag**2 + _TINY)
    return f


def ml_amplitude_nll(f_obs, sig_f_obs, f_model_abs, d, s, centric, epsilon):
    """Per-reflection −log P(Fo | |Fm|) (see the module docstring); (n,) arrays -> (n,) (numpy for numpy arguments:
    :func:`jaxrefine.core.device.array_module`)."""
    xp = array_module(f_obs, sig_f_obs, f_model_abs, d, s, centric, epsilon)
    i0e = special_module(xp).i0e
    fo = xp.asarray(f_obs)
    sig = xp.asarray(sig_f_obs)
    eps = xp.asarray(epsilon, fo.dtype)
    cen = xp.asarray(centric, bool)
    dfc = d * f_model_abs
    sum_a = eps * s + 2.0 * sig**2
    sum_c = eps * s + sig**2
    log_fo = xp.log(xp.where(fo > 0, fo, 1.0))
    # (Fo² + (D|Fm|)²)/Σ − X = (Fo − D|Fm|)²/Σ: the exponential parts of I0 and cosh are folded into
    # the square so that no large terms cancel (float32: Fo²/Σ can reach 1e6).
    x_a = 2.0 * fo * dfc / sum_a
    nll_a = -(xp.log(2.0) + log_fo - xp.log(sum_a)) + (fo - dfc) ** 2 / sum_a - xp.log(i0e(x_a))
    x_c = fo * dfc / sum_c  # >= 0; log cosh x = x + log1p(exp(−2x)) − log 2
    nll_c = -0.5 * xp.log(2.0 / (xp.pi * sum_c)) + (fo - dfc) ** 2 / (2.0 * sum_c) - xp.log1p(xp.exp(-2.0 * x_c)) + xp.log(2.0)
    return xp.where(cen, nll_c, nll_a)


def ml_amplitude_target(f_obs, sig_f_obs, f_model, sigma_a: SigmaA, centric, epsilon, mask):
    """Maximum-likelihood amplitude target: Σ_mask −log P(Fo | F_model).

    Pure JAX, jit-able, differentiable wrt ``f_model`` (complex) and the scale parameters
    inside it; numpy for numpy arguments (:func:`jaxrefine.core.device.array_module`: host reports).

    Args:
        f_obs: (n,) observed amplitudes.
        sig_f_obs: (n,) their σ (pass zeros to ignore measurement error).
        f_model: (n,) complex F_model scaled to F_obs (or real |F_model|).
        sigma_a: :class:`SigmaA` (per-reflection D and S; only ``d`` and ``s`` are used).
        centric: (n,) bool.
        epsilon: (n,) statistical weights ε.
        mask: (n,) bool or 0/1 weights, usually the work set.

    Returns:
        scalar −log-likelihood summed over the masked reflections.
    """
    xp = array_module(f_obs, sig_f_obs, f_model, sigma_a.d, sigma_a.s, centric, epsilon, mask)
    nll = ml_amplitude_nll(f_obs, sig_f_obs, _abs(f_model), sigma_a.d, sigma_a.s, centric, epsilon)
    m = xp.asarray(mask)
    return xp.sum(xp.where(m > 0, m * nll, 0.0))


def ls_amplitude_target(f_obs, sig_f_obs, f_model, mask, scale=None, use_sigma: bool = True):
    """σ-weighted least squares on amplitudes: ½ Σ_mask w (Fo − k|Fm|)², w = 1/σ².

    Args:
        f_obs, sig_f_obs: (n,) amplitudes and σ (σ <= 0 gives weight 1).
        f_model: (n,) complex (or real) F_model.
        mask: (n,) bool or 0/1 weights (work set).
        scale: k; None uses the analytic best k = Σ w Fo|Fm| / Σ w |Fm|² (differentiated through).
        use_sigma: False gives unit weights.

    Returns:
        scalar target.
    """
    fo = jnp.asarray(f_obs)
    fm = _abs(f_model)
    w = ls_weights(sig_f_obs, mask, fo.dtype) if use_sigma else jnp.asarray(mask, fo.dtype)
    k = ls_scale(fo, fm, w) if scale is None else scale
    return 0.5 * jnp.sum(w * (fo - k * fm) ** 2)


def ls_weights(sig_f_obs, mask, dtype=None):
    """(n,) weights of the LS target: 1/σ² (1 where σ <= 0), times ``mask``."""
    sig = jnp.asarray(sig_f_obs)
    w = jnp.where(sig > 0, 1.0 / jnp.where(sig > 0, sig, 1.0) ** 2, 1.0)
    return w * jnp.asarray(mask, dtype or sig.dtype)


def ls_scale(f_obs, f_model_abs, w):
    """The LS target's best scale k = Σ w Fo|Fm| / Σ w |Fm|²."""
    return jnp.sum(w * f_obs * f_model_abs) / jnp.sum(w * f_model_abs * f_model_abs)


def sigma_a_bins(d, use, min_per_bin: int = MIN_PER_BIN, max_bins: int = MAX_BINS) -> np.ndarray:
    """Resolution bins with about ``min_per_bin`` reflections of the ``use`` set each.

    Bin edges are equal-count quantiles of d over the ``use`` reflections; every reflection (of
    any set) gets the bin its d falls in. Returns (n,) int, bin 0 at low resolution.
    """
    d = np.asarray(d, float)
    du = np.sort(d[np.asarray(use, bool)])[::-1]
    n_bins = int(np.clip(len(du) // min_per_bin, 1, max_bins))
    edges = du[(np.arange(1, n_bins) * len(du)) // n_bins]  # decreasing d
    return np.searchsorted(-edges, -d, side="right").astype(np.int32)


# σA fit: a damped Newton iteration per bin, in numpy float64 (it was one compiled program per fit until
# 2026-12-04: 0.43 s to compile beside the minimiser's program in a cold run, ~0.25 s to load in a warm one; the
# fit itself takes a few ms either way).  The objective is a sum over bins, each bin's two parameters (ln D, ln S)
# reaching only its own reflections, so its Hessian is one 2×2 block per bin, written out (_bin_derivatives).
# Each bin keeps its own Levenberg-Marquardt damping (Nocedal & Wright 2006, sec. 10.3): a step that
# raises its bin's −log-likelihood beyond rounding is refused and the damping raised ×10, an accepted one lowers
# it ×0.3.  Steps are taken until they change ln D, ln S by < 1e-6 (with a strict decrease and 1e-4 the end point
# moved by 1e-4 in ln S with the rounding of F_calc: 5e5z's energy gradient with and without jaxrefine's XLA flag
# then differed by 1.5e-4 of its largest component, against 7e-8 with scipy's fit; now the end points agree to
# ~5e-7 in ln S and the gradients within tests/test_cache.py's 1e-4 again).
# It replaced scipy's L-BFGS-B over a compiled gradient (40-80 evaluations, one host round trip each): a warm 4xof
# run's 6 fits 0.60 -> 0.27 s (0.25 s of it loading the program; then ~5 ms a fit), the −log-likelihood the same
# or lower on every shared dataset's free and work sets (5orl's free set 10786.27 -> 10786.20).
SIGMA_A_NEWTON_ITER = 30  # at most; a bin stops once its steps change ln D, ln S by < SIGMA_A_STEP_TOL
SIGMA_A_STEP_TOL = 1e-6
SIGMA_A_DAMPING0 = 1e-3  # × the block's largest diagonal element
SIGMA_A_DAMPING_MAX = 1e3  # a bin whose steps are refused until its damping reaches this has converged


def _bin_values(p, fo, sig, fm, cen, eps, bins, onehot):
    """Per bin −log-likelihood (n_bins,) of ln D, ln S ``p`` (n_bins, 2); ``onehot`` (n, n_bins) the bins."""
    xp = array_module(p, fo, fm, onehot)
    return ml_amplitude_nll(fo, sig, fm, xp.exp(p[bins, 0]), xp.exp(p[bins, 1]), cen, eps) @ onehot


def _bin_derivatives(p, fo, sig, fm, cen, eps, bins, onehot):
    """Per bin: gradient (n_bins, 2) and Hessian (n_bins, 2, 2) of the −log-likelihood wrt (ln D, ln S).

    In closed form (the program compiles in 0.11 s where JAX's derivatives of it, through i0e twice, took 0.28 s;
    tests/test_fmodel.py checks both agree): up to constants each reflection's term is
    nll = c₁ (ln Σ + (Fo² + a²)/Σ) − L(x), with a = D|Fm|, Σ = εS + k σ², x = c₂ Fo a / Σ and, acentric,
    c₁ = 1, c₂ = 2, k = 2, L = ln I₀; centric c₁ = ½, c₂ = 1, k = 1, L = ln cosh (:func:`ml_amplitude_nll`).
    With u = ln D, v = ln S, w = εS/Σ, q = (Fo² + a²)/Σ, m = L'(x) (I₁/I₀ or tanh) and m' = L''(x)
    (1 − m/x − m² for the Bessel ratio, 1 − m² for tanh):  ∂x/∂u = x, ∂x/∂v = −w x, and
    nll_u = 2c₁a²/Σ − m x,  nll_uu = 4c₁a²/Σ − m x − m' x²,  nll_v = w B with B = c₁(1 − q) + m x,
    nll_uv = −2c₁ w a²/Σ + (m' x + m) x w,  nll_vv = w(1 − w) B + w (c₁ q w − (m' x + m) x w).
    """
    xp = array_module(p, fo, sig, fm, cen, eps, bins, onehot)
    special = special_module(xp)
    d, s = xp.exp(p[bins, 0]), xp.exp(p[bins, 1])
    c1 = xp.where(cen, 0.5, 1.0)
    t = xp.asarray(eps, fo.dtype) * s
    big = t + xp.where(cen, 1.0, 2.0) * sig * sig
    a = d * fm
    x = xp.where(cen, 1.0, 2.0) * fo * a / big
    m_bessel = special.i1e(x) / special.i0e(x)
    m_over_x = xp.where(x > 1e-6, m_bessel / xp.where(x > 1e-6, x, 1.0), 0.5)  # I₁/I₀ ≈ x/2 near 0
    m = xp.where(cen, xp.tanh(x), m_bessel)
    dm = xp.where(cen, 1.0 - m * m, 1.0 - m_over_x - m * m)
    w = t / big
    q = (fo * fo + a * a) / big
    a2 = a * a / big
    b = c1 * (1.0 - q) + m * x
    grads = xp.stack([2.0 * c1 * a2 - m * x, w * b])
    h_uu = 4.0 * c1 * a2 - m * x - dm * x * x
    h_uv = -2.0 * c1 * w * a2 + (dm * x + m) * x * w
    h_vv = w * (1.0 - w) * b + w * (c1 * q * w - (dm * x + m) * x * w)
    g = (grads @ onehot).T  # (n_bins, 2)
    dd, ds, ss = xp.stack([h_uu, h_uv, h_vv]) @ onehot
    return g, xp.stack([xp.stack([dd, ds], -1), xp.stack([ds, ss], -1)], -2)


def _fit_bins(p0, fo, sig, fm, cen, eps, bins):
    """(n_bins, 2) ln D, ln S lowering each bin's −log-likelihood from ``p0`` (see above), within the bounds; numpy
    float64 on the host (a few ms: no XLA program to compile, 0.43 s beside the minimiser's in a cold 1va7 run, or to
    load, ~0.25 s of a warm one)."""
    p0, fo, sig, fm, eps = (np.asarray(a, float) for a in (p0, fo, sig, fm, eps))
    cen, bins = np.asarray(cen, bool), np.asarray(bins, np.int64)
    n_bins = p0.shape[0]
    onehot = (bins[:, None] == np.arange(n_bins)[None, :]).astype(float)
    lo = np.asarray([LN_D_BOUNDS[0], LN_S_BOUNDS[0]])
    hi = np.asarray([LN_D_BOUNDS[1], LN_S_BOUNDS[1]])
    p, value = p0.copy(), _bin_values(p0, fo, sig, fm, cen, eps, bins, onehot)
    mu, done = np.full(n_bins, SIGMA_A_DAMPING0), np.zeros(n_bins, bool)
    for _ in range(SIGMA_A_NEWTON_ITER):
        if done.all():
            break
        g, h = _bin_derivatives(p, fo, sig, fm, cen, eps, bins, onehot)
        scale = np.maximum(np.max(np.abs(np.diagonal(h, axis1=-2, axis2=-1)), -1), 1e-12)
        a = h + (mu * scale)[:, None, None] * np.eye(2)
        det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
        adj = np.stack([np.stack([a[:, 1, 1], -a[:, 0, 1]], -1), np.stack([-a[:, 1, 0], a[:, 0, 0]], -1)], -2)
        delta = -np.einsum("bij,bj->bi", adj, g) / np.where(det > 0, det, 1.0)[:, None]
        trial = np.clip(p + np.clip(delta, -1.0, 1.0), lo, hi)  # at most a factor e in D or S per step
        descent = ~done & (det > 0) & (a[:, 0, 0] > 0) & np.all(np.isfinite(trial), -1)  # damped Hessian pos. def.
        trial = np.where(descent[:, None], trial, p)
        trial_value = _bin_values(trial, fo, sig, fm, cen, eps, bins, onehot)
        # a step is refused when it raises its bin's value by more than rounding: near the minimum the values stop
        # resolving the decrease while the gradient still guides the steps (else the end point varies with rounding)
        ok = descent & (trial_value <= value + 8.0 * np.finfo(float).eps * np.abs(value))
        mu = np.where(ok, 0.3 * mu, np.where(done, mu, 10.0 * mu))
        small = np.max(np.abs(trial - p), -1) < SIGMA_A_STEP_TOL
        done = done | (ok & small) | (mu >= SIGMA_A_DAMPING_MAX)
        p, value = np.where(ok[:, None], trial, p), np.where(ok, trial_value, value)
    return p


def estimate_sigma_a(f_obs, f_model, use, bins, centric, epsilon, sig_f_obs=None) -> SigmaA:
    """Maximum-likelihood D and S per resolution bin (outside jit; refresh every macrocycle).

    The −log-likelihood of the ``use`` reflections (the free set, as in Pannu & Read 1996 and
    Lunin & Skovoroda 1995, Acta Cryst. A51, 880; or the work set when the free set is too small)
    is minimised over log D and log S of every bin by damped Newton steps (:func:`_fit_bins`), from the moments
    D = Σ Fo|Fm| / Σ|Fm|², S = ⟨(Fo² − D²|Fm|²)/ε⟩.

    Args:
        f_obs: (n,) amplitudes; f_model: (n,) complex scaled F_model.
        use: (n,) bool, reflections used for the estimate.
        bins: (n,) int bin index (see :func:`sigma_a_bins`).
        centric: (n,) bool; epsilon: (n,) int.
        sig_f_obs: (n,) σ of F_obs (folded into the variance); None for zeros.

    Returns:
        :class:`SigmaA`.
    """
    fo = np.asarray(f_obs, float)
    fm = np.abs(np.asarray(f_model))
    sig = np.zeros_like(fo) if sig_f_obs is None else np.asarray(sig_f_obs, float)
    eps = np.asarray(epsilon, float)
    bins = np.asarray(bins, np.int32)
    use = np.asarray(use, bool)
    n_bins = int(bins.max()) + 1
    p0 = np.zeros((n_bins, 2))
    for i in range(n_bins):
        sel = use & (bins == i)
        if not sel.any():
            sel = bins == i
        dd = np.sum(fo[sel] * fm[sel]) / max(np.sum(fm[sel] ** 2), 1e-300)
        dd = float(np.clip(dd, *D_START_RANGE))
        ss = np.mean((fo[sel] ** 2 - (dd * fm[sel]) ** 2) / eps[sel])
        ss = max(ss, S_START_FLOOR * np.mean(fo[sel] ** 2 / eps[sel]), 1e-6)
        p0[i] = np.log(dd), np.log(ss)
    # only the reflections used enter the objective (the free set: ~5 % of them)
    k = np.flatnonzero(use)
    p = p0.copy()
    if len(k):
        p = _fit_bins(p0, *(np.asarray(a)[k] for a in (fo, sig, fm, np.asarray(centric, bool), eps, bins)))
    empty = np.array([not (use & (bins == i)).any() for i in range(n_bins)])
    p[empty] = p0[empty]
    bin_d, bin_s = np.exp(p[:, 0]), np.exp(p[:, 1])
    return SigmaA(d=on_device(bin_d[bins]), s=on_device(bin_s[bins]), bins=bins, bin_d=bin_d, bin_s=bin_s)


def choose_sigma_a_set(free, min_per_bin: int = MIN_PER_BIN):
    """The free set when it has at least 2 bins' worth of reflections, else the work set (as servalcat)."""
    free = np.asarray(free, bool)
    if free.sum() >= 2 * min_per_bin:
        return free, "free"
    return ~free, "work"
