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
from jax.scipy.special import i0e

from ..core.device import on_device

MIN_PER_BIN = 50  # reflections per σA bin (servalcat's default for the test set)
MAX_BINS = 20
_TINY = 1e-12  # added to |F|² so that |F| is differentiable at F = 0
# σA fit (estimate_sigma_a): D and S per bin by L-BFGS-B on ln D, ln S from a least-squares start
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
    f = jnp.asarray(f)
    if jnp.iscomplexobj(f):
        return jnp.sqrt(f.real**2 + f.imag**2 + _TINY)
    return f


def ml_amplitude_nll(f_obs, sig_f_obs, f_model_abs, d, s, centric, epsilon):
    """Per-reflection −log P(Fo | |Fm|) (see the module docstring); (n,) arrays -> (n,)."""
    fo = jnp.asarray(f_obs)
    sig = jnp.asarray(sig_f_obs)
    eps = jnp.asarray(epsilon, fo.dtype)
    cen = jnp.asarray(centric, bool)
    dfc = d * f_model_abs
    sum_a = eps * s + 2.0 * sig**2
    sum_c = eps * s + sig**2
    log_fo = jnp.log(jnp.where(fo > 0, fo, 1.0))
    # (Fo² + (D|Fm|)²)/Σ − X = (Fo − D|Fm|)²/Σ: the exponential parts of I0 and cosh are folded into
    # the square so that no large terms cancel (float32: Fo²/Σ can reach 1e6).
    x_a = 2.0 * fo * dfc / sum_a
    nll_a = -(jnp.log(2.0) + log_fo - jnp.log(sum_a)) + (fo - dfc) ** 2 / sum_a - jnp.log(i0e(x_a))
    x_c = fo * dfc / sum_c  # >= 0; log cosh x = x + log1p(exp(−2x)) − log 2
    nll_c = -0.5 * jnp.log(2.0 / (jnp.pi * sum_c)) + (fo - dfc) ** 2 / (2.0 * sum_c) - jnp.log1p(jnp.exp(-2.0 * x_c)) + jnp.log(2.0)
    return jnp.where(cen, nll_c, nll_a)


def ml_amplitude_target(f_obs, sig_f_obs, f_model, sigma_a: SigmaA, centric, epsilon, mask):
    """Maximum-likelihood amplitude target: Σ_mask −log P(Fo | F_model).

    Pure JAX, jit-able, differentiable wrt ``f_model`` (complex) and the scale parameters
    inside it.

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
    nll = ml_amplitude_nll(f_obs, sig_f_obs, _abs(f_model), sigma_a.d, sigma_a.s, centric, epsilon)
    m = jnp.asarray(mask)
    return jnp.sum(jnp.where(m > 0, m * nll, 0.0))


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
    sig = jnp.asarray(sig_f_obs)
    w = jnp.where(sig > 0, 1.0 / jnp.where(sig > 0, sig, 1.0) ** 2, 1.0) if use_sigma else jnp.ones_like(fo)
    w = w * jnp.asarray(mask, fo.dtype)
    k = jnp.sum(w * fo * fm) / jnp.sum(w * fm * fm) if scale is None else scale
    return 0.5 * jnp.sum(w * (fo - k * fm) ** 2)


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


@jax.jit
def _binned_nll(p, fo, sig, fm, cen, eps, bins):
    d = jnp.exp(p[:, 0])[bins]
    s = jnp.exp(p[:, 1])[bins]
    return jnp.sum(ml_amplitude_nll(fo, sig, fm, d, s, cen, eps))


_binned_grad = jax.jit(jax.value_and_grad(_binned_nll))


def estimate_sigma_a(f_obs, f_model, use, bins, centric, epsilon, sig_f_obs=None) -> SigmaA:
    """Maximum-likelihood D and S per resolution bin (outside jit; refresh every macrocycle).

    The −log-likelihood of the ``use`` reflections (the free set, as in Pannu & Read 1996 and
    Lunin & Skovoroda 1995, Acta Cryst. A51, 880; or the work set when the free set is too small)
    is minimised over log D and log S of every bin by L-BFGS-B, starting from the moments
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
    from scipy.optimize import minimize

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
    # only the reflections used enter the objective (the free set: ~5 % of them); device_put, not
    # jnp.asarray: jnp.asarray of a numpy array is a one-operation program per shape
    k = np.flatnonzero(use)
    args = tuple(on_device(np.asarray(a)[k]) for a in (fo, sig, fm, np.asarray(centric, bool), eps, bins))

    def fun(x):
        v, g = _binned_grad(jax.device_put(x.reshape(n_bins, 2)), *args)
        return float(v), np.asarray(g, float).ravel()

    p = p0.copy()
    if len(k):
        res = minimize(fun, p0.ravel(), jac=True, method="L-BFGS-B", bounds=[LN_D_BOUNDS, LN_S_BOUNDS] * n_bins)
        p = res.x.reshape(n_bins, 2)
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
