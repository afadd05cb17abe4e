"""Atomic scattering factors as sums of Gaussians.

f0(s) = sum_k a_k exp(-b_k s^2 / 4) + c, with s = 1/d (Å^-1).
Coefficients: International Tables for Crystallography Vol. C (1992), Table 6.1.1.4
("IT92" four-Gaussian fit), as tabulated in gemmi (``gemmi.Element(el).it92``).
The table is read in :mod:`jaxrefine.io.formfactor_io`; this module evaluates it and, for the FFT
spreading, refits it with fewer Gaussians over the data's resolution range (:func:`fit_form_factors`).
"""
from __future__ import annotations

from functools import lru_cache

import jax.numpy as jnp
import numpy as np

from ..core.cache import read_table, write_table
from ..core.formfactors import FormFactors


def f0(ff: FormFactors, s2):
    """Scattering factor of every type at 1/d^2 = s2.

    Args:
        ff: coefficients.
        s2: (n_refl,) 1/d^2 (Å^-2).

    Returns:
        (n_refl, n_types) f0 (electrons).
    """
    s2 = jnp.asarray(s2)
    return jnp.einsum("tg,rtg->rt", ff.a, jnp.exp(-ff.b[None] * s2[:, None, None] / 4.0)) + ff.c[None]


# ------------------------------------------------------------------ fewer Gaussians for the FFT spreading
FIT_TOL = 1e-4  # relative error of the model's refitted f0 over the data's range (see model_fit_error): below the FFT's own (~2e-4)
# and no type's f0 further than this many FIT_TOL from the table, however few its atoms (a lone metal ion, the S of
# a few methionines)
FIT_TYPE_CAP = 10.0
FIT_MAX_TERMS = 4  # the IT92 form has 5 terms (4 Gaussians and the constant); more than 4 would not pay
_FIT_POINTS = 200
FIT_TABLE = "form_factor_fits"  # the fits kept beside the compiled programs (core.cache.read_table)


@lru_cache(maxsize=256)
def _fit_terms(abc: tuple, s2_max: float, n: int):
    """n Gaussians (no constant) fitted to one IT92 f0 (``abc`` = (a..., b..., c)) on [0, s2_max], least
    squares of the relative error: (a (n,), b (n,), largest relative error)."""
    from scipy.optimize import least_squares  # scipy comes with jax; setup only

    k = (len(abc) - 1) // 2
    a, b, c = np.asarray(abc[:k]), np.asarray(abc[k:2 * k]), abc[-1]
    s2 = np.linspace(0.0, s2_max, _FIT_POINTS)
    y = (a[None] * np.exp(-b[None] * s2[:, None] / 4.0)).sum(1) + c

    def parts(th):
        e = np.exp(-np.exp(th[n:])[None] * s2[:, None] / 4.0)  # (points, n)
        return e, ((th[:n][None] * e).sum(1) - y) / y

    def rel(th):
        return parts(th)[1]

    def jac(th):  # d rel / d a_k and d rel / d log b_k
        e, _ = parts(th)
        bk = np.exp(th[n:])
        return np.concatenate([e, -th[:n][None] * e * bk[None] * s2[:, None] / 4.0], axis=1) / y[:, None]

    # start: the table's terms (the constant as width 0.05) pooled into n groups of neighbouring widths
    aa, bb = np.append(a, c), np.append(b, 0.05)
    groups = np.array_split(np.argsort(bb), n)
    a0 = np.array([aa[g].sum() for g in groups])
    b0 = np.array([max(float((aa[g] * bb[g]).sum() / aa[g].sum()), 0.05) for g in groups])
    with np.errstate(over="ignore", invalid="ignore"):
        r = least_squares(rel, np.concatenate([a0, np.log(b0)]), jac=jac, method="lm", max_nfev=500)
        err = float(np.max(np.abs(rel(r.x))))
    return r.x[:n], np.exp(r.x[n:]), err if np.isfinite(err) else np.inf


def model_fit_error(type_errors, z, counts) -> float:
    """Relative error of F from the types' refitted f0 in Wilson's random-atom model: |F|² ≈ Σ_j f_j² and an error
    e_j = r_j f_j of every atom adds |ΔF|² ≈ Σ_j e_j², so the error is the RMS of the types' relative errors ``r_t``
    weighted by their atom counts and Z² (f0 at s = 0; Wilson 1949, Acta Cryst. 2, 318).  A few light or rare atoms
    barely count: 4xof's 704 riding H at 1.15 Å (H's three-Gaussian fit 2e-4 off its own f0, 6× less than a
    carbon's at FIT_TOL in electrons) or 1l2h's eight S at 1.54 Å (2e-4)."""
    w = np.asarray(counts, float) * np.asarray(z, float) ** 2
    r = np.asarray(type_errors, float)
    return float(np.sqrt(np.sum(w * r**2) / max(np.sum(w), 1e-300)))


def fit_form_factors(ff: FormFactors, s2_max: float, tol: float = FIT_TOL):
    """The form factors as fewer Gaussians over the data's range, where that is accurate enough.

    Spreading costs one Gaussian per term and atom; IT92 has five terms (four Gaussians and the
    constant).  Over a limited range 0 <= s² <= s2_max fewer Gaussians reproduce f0: measured
    largest relative errors, two Gaussians at 2.9 Å 3e-5 (C, N, O, S, H), three at 1.69 Å
    2e-6 to 9e-5.  The smallest n in 2..FIT_MAX_TERMS is used whose fits give the model's F to ``tol``
    (:func:`model_fit_error`, the atoms counted from ``ff.type_index``) with no type's f0 beyond FIT_TYPE_CAP ×
    ``tol`` (one n for all types: the arrays are (n_types, n)).  Judged type by type, 4xof's riding
    hydrogens (1.15 Å) and 1l2h's eight sulphurs (1.54 Å) gave every atom four Gaussians instead of three.

    Args:
        ff: IT92 coefficients (numpy).
        s2_max: largest 1/d² (Å⁻²) of the reflections.
        tol: relative error of F from the refitted f0 on [0, s2_max] (see above).

    Returns:
        (FormFactors with c = 0, n) or (ff, 0) when no n is accurate enough.
    """
    a, b, c = (np.asarray(v, float) for v in ff[:3])
    s2_max = float(np.float32(s2_max))  # the cache key: one fit per element and resolution
    stored = read_table(FIT_TABLE)  # fits of earlier processes (0.33 s of a warm 5e5z setup: five types, n = 2, 3)
    new = {}

    def fit(abc: tuple, n: int):
        key = repr((tuple(float(v) for v in abc), s2_max, n, _FIT_POINTS))
        if key in stored:
            got = stored[key]
            return np.asarray(got[0], float), np.asarray(got[1], float), float(got[2])
        out = _fit_terms(abc, s2_max, n)
        new[key] = [out[0].tolist(), out[1].tolist(), out[2] if np.isfinite(out[2]) else 1e300]
        return out

    z = a.sum(1) + c
    counts = np.bincount(np.asarray(ff.type_index, np.int64).reshape(-1), minlength=a.shape[0])
    result = ff, 0
    for n in range(2, FIT_MAX_TERMS + 1):
        fits = []
        for t in range(a.shape[0]):
            fits.append(fit(tuple(a[t]) + tuple(b[t]) + (float(c[t]),), n))
            if fits[-1][2] > FIT_TYPE_CAP * tol:
                break
        else:
            if model_fit_error([f[2] for f in fits], z, counts) > tol:
                continue
            result = FormFactors(np.stack([f[0] for f in fits]), np.stack([f[1] for f in fits]),
                                 np.zeros(a.shape[0]), np.asarray(ff.type_index)), n
            break
    if new:
        write_table(FIT_TABLE, {**read_table(FIT_TABLE), **new})
    return result
