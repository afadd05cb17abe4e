"""Agreement statistics between |F_obs| and |F_model|: R-work, R-free, correlations, per bin.

R = Σ | |F_obs| − |F_model| | / Σ |F_obs|   (Brünger 1992, Nature 355, 472 for R-free).
"""
from __future__ import annotations

import numpy as np

from ..core.crystal import resolution_bins


def _abs(f):
    f = np.asarray(f)
    return np.abs(f) if np.iscomplexobj(f) else f


def r_factor(f_obs, f_model, mask=None) -> float:
    """Σ|Fo − |Fm|| / ΣFo over ``mask`` (all when None); nan when empty."""
    fo, fm = np.asarray(f_obs, float), _abs(f_model)
    sel = np.ones(fo.shape, bool) if mask is None else np.asarray(mask, bool)
    den = fo[sel].sum()
    return float(np.abs(fo[sel] - fm[sel]).sum() / den) if sel.any() and den > 0 else float("nan")


def best_scale(f_obs, f_calc, mask=None) -> float:
    """Least-squares scale k = Σ Fo|Fc| / Σ |Fc|² minimising Σ(Fo − k|Fc|)²."""
    fo, fc = np.asarray(f_obs, float), _abs(f_calc)
    sel = np.ones(fo.shape, bool) if mask is None else np.asarray(mask, bool)
    return float(np.sum(fo[sel] * fc[sel]) / max(np.sum(fc[sel] ** 2), 1e-300))


def r_factor_best_scale(f_obs, f_calc, mask=None) -> float:
    """R-factor of k|F_calc| with the analytic least-squares scale k (no solvent, no anisotropy)."""
    return r_factor(f_obs, best_scale(f_obs, f_calc, mask) * _abs(f_calc), mask)


def correlation(f_obs, f_model, mask=None) -> float:
    """Pearson correlation of |F_obs| and |F_model| over ``mask``."""
    fo, fm = np.asarray(f_obs, float), _abs(f_model)
    sel = np.ones(fo.shape, bool) if mask is None else np.asarray(mask, bool)
    if sel.sum() < 2:
        return float("nan")
    return float(np.corrcoef(fo[sel], fm[sel])[0, 1])


def r_factors(f_obs, f_model, free, d=None, bins=None, n_bins: int = 10) -> dict:
    """R-work, R-free and correlations, overall and per resolution bin.

    Args:
        f_obs: (n,) observed amplitudes.
        f_model: (n,) complex F_model (or its amplitudes), already scaled to F_obs.
        free: (n,) bool, True for the free (test) set.
        d: (n,) resolution (Å); needed for the per-bin table.
        bins: (n,) int bin index; equal-count bins of ``d`` when None.
        n_bins: number of bins when ``bins`` is None.

    Returns:
        dict with r_work, r_free, n_work, n_free, cc_work, cc_free and ``bins``: a list of dicts
        (d_max, d_min, n_work, n_free, r_work, r_free, cc_work, cc_free), low resolution first.
    """
    fo, fm = np.asarray(f_obs, float), _abs(f_model)
    free = np.asarray(free, bool)
    work = ~free
    out = {
        "r_work": r_factor(fo, fm, work),
        "r_free": r_factor(fo, fm, free),
        "n_work": int(work.sum()),
        "n_free": int(free.sum()),
        "cc_work": correlation(fo, fm, work),
        "cc_free": correlation(fo, fm, free),
    }
    table = []
    if d is not None:
        d = np.asarray(d, float)
        if bins is None:
            bins = resolution_bins(d, n_bins)
        for i in range(int(np.max(bins)) + 1):
            sel = np.asarray(bins) == i
            if not sel.any():
                continue
            table.append(
                {
                    "d_max": float(d[sel].max()),
                    "d_min": float(d[sel].min()),
                    "n_work": int((sel & work).sum()),
                    "n_free": int((sel & free).sum()),
                    "r_work": r_factor(fo, fm, sel & work),
                    "r_free": r_factor(fo, fm, sel & free),
                    "cc_work": correlation(fo, fm, sel & work),
                    "cc_free": correlation(fo, fm, sel & free),
                }
            )
    out["bins"] = table
    return out
