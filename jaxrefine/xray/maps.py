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

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import i0e, i1e

from ..core.device import on_device


def figure_of_merit(f_obs, f_model_abs, d, s, centric, epsilon, sig_f_obs=None):
    """(n,) figure of merit m for the ML model of :mod:`jaxrefine.xray.targets`."""
    fo = jnp.asarray(f_obs)
    sig = jnp.zeros_like(fo) if sig_f_obs is None else jnp.asarray(sig_f_obs)
    eps = jnp.asarray(epsilon, fo.dtype)
    x_a = 2.0 * fo * d * f_model_abs / (eps * s + 2.0 * sig**2)
    x_c = fo * d * f_model_abs / (eps * s + sig**2)
    return jnp.where(jnp.asarray(centric, bool), jnp.tanh(x_c), i1e(x_a) / i0e(x_a))


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
    # one dtype per argument whatever the caller holds (numpy float64 or device float32 σA, complex64 or
    # complex128 F_model), so that the compiled program is reused
    # host arrays go over with a numpy cast (no one-operation conversion program: core/device.py)
    fo = on_device(np.nan_to_num(np.asarray(f_obs, float)))
    real = lambda a: on_device(a, fo.dtype)  # noqa: E731
    return _coefficients(fo, on_device(f_model, jnp.result_type(fo.dtype, jnp.complex64)), real(sigma_a.d), real(sigma_a.s),
                         on_device(centric, bool), real(epsilon), None if observed is None else on_device(observed, bool),
                         None if sig_f_obs is None else real(sig_f_obs))


@jax.jit
def _coefficients(fo, fm, d, s, centric, epsilon, observed, sig_f_obs):
    """:func:`map_coefficients` on arrays (one compiled program: host code called it op by op)."""
    fm_abs = jnp.abs(fm)
    phase = jnp.where(fm_abs > 0, fm / jnp.where(fm_abs > 0, fm_abs, 1.0), 1.0)
    m = figure_of_merit(fo, fm_abs, d, s, centric, epsilon, sig_f_obs)
    cen = jnp.asarray(centric, bool)
    dfc = d * fm_abs
    two = jnp.where(cen, m * fo, 2.0 * m * fo - dfc) * phase
    diff = (m * fo - dfc) * phase
    if observed is not None:
        obs = jnp.asarray(observed, bool)
        two = jnp.where(obs, two, d * fm)
        diff = jnp.where(obs, diff, 0.0)
    return two, diff
