"""σA-weighted map coefficients 2mFo−DFc and mFo−DFc.

Read (1986), Acta Cryst. A42, 140: with X the argument of the likelihood's Bessel/cosh term,
the figure of merit is m = I1(X)/I0(X), X = 2 D Fo |Fm| / Σ for acentric reflections and
m = tanh(X), X = D Fo |Fm| / Σ for centric ones (Σ as in :mod:`jaxrefine.xray.targets`). The
coefficients, all with the phase of F_model, are

  acentric: 2mFo − D|Fm|  and  mFo − D|Fm|;   centric: mFo  and  mFo − D|Fm|.

Reflections without an observation get D·F_model in 2mFo−DFc and 0 in mFo−DFc (the usual
fill-in, e.g. phenix.maps and servalcat).
"""
from __future__ import annotations

import numpy as np

from ..core.device import array_module, special_module


def figure_of_merit(f_obs, f_model_abs, d, s, centric, epsilon, sig_f_obs=None):
    """(n,) figure of merit m for the ML model of :mod:`jaxrefine.xray.targets` (numpy for numpy arguments, see
    :func:`jaxrefine.core.device.array_module`; scipy's or JAX's exponentially scaled Bessel functions)."""
    xp = array_module(f_obs, f_model_abs, d, s, centric, epsilon, sig_f_obs)
    special = special_module(xp)
    fo = xp.asarray(f_obs)
    sig = xp.zeros_like(fo) if sig_f_obs is None else xp.asarray(sig_f_obs)
    eps = xp.asarray(epsilon, fo.dtype)
    x_a = 2.0 * fo * d * f_model_abs / (eps * s + 2.0 * sig**2)
    x_c = fo * d * f_model_abs / (eps * s + sig**2)
    return xp.where(xp.asarray(centric, bool), xp.tanh(x_c), special.i1e(x_a) / special.i0e(x_a))


def map_coefficients(f_obs, f_model, sigma_a, centric, epsilon, observed=None, sig_f_obs=None):
    """σA-weighted 2mFo−DFc and mFo−DFc coefficients.

    Args:
        f_obs: (n,) amplitudes (any value where not observed).
        f_model: (n,) complex F_model scaled to F_obs.
        sigma_a: :class:`jaxrefine.xray.targets.SigmaA` for these n reflections (``d``, ``s``).
        centric: (n,) bool; epsilon: (n,) int.
        observed: (n,) bool; False marks reflections to fill in with D·F_model (None: all observed).
        sig_f_obs: (n,) σ folded into the variance as in the ML target (None: ignored, the
            conventional choice for maps).

    Returns:
        (two_fofc, fofc): (n,) complex each.
    """
    # on the host in float64 (numpy; no XLA program to compile or load, where the water check and the writers
    # called one per run), whatever the caller holds (numpy, or device arrays of the X-ray state)
    real = lambda a: None if a is None else np.asarray(a, float)  # noqa: E731
    fo = np.nan_to_num(real(f_obs))
    fm = np.asarray(f_model, complex)
    d, s = real(sigma_a.d), real(sigma_a.s)
    fm_abs = np.abs(fm)
    phase = np.where(fm_abs > 0, fm / np.where(fm_abs > 0, fm_abs, 1.0), 1.0)
    m = figure_of_merit(fo, fm_abs, d, s, np.asarray(centric, bool), real(epsilon), real(sig_f_obs))
    cen = np.asarray(centric, bool)
    dfc = d * fm_abs
    two = np.where(cen, m * fo, 2.0 * m * fo - dfc) * phase
    diff = (m * fo - dfc) * phase
    if observed is not None:
        obs = np.asarray(observed, bool)
        two = np.where(obs, two, d * fm)
        diff = np.where(obs, diff, 0.0)
    return two, diff
