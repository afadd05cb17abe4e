"""Host arrays onto the device without compiling anything.

``jnp.asarray(numpy_array, dtype)`` and ``jnp.zeros(shape, dtype)`` outside jit each run a one-operation XLA
program (a dtype conversion, a broadcast) compiled for that shape and dtype: ~30 of them in a problem's setup,
15-20 ms each to compile in a cold run and ~10 ms each to look up and load from the persistent cache in a warm
one.  Casting with numpy and transferring with ``jax.device_put`` gives the same array (same dtype after JAX's
canonicalisation, not weakly typed) with no program at all.

The arrays are committed to the default device, as the outputs of the stored programs are
(:func:`jaxrefine.core.cache.call_exported`): JAX compiles a jitted function once more for each mix of committed
and uncommitted arguments, so a function called on the setup's arrays and then on a minimisation's output
(``_model_arrays``, ``apply_shifts``: 4xof) was compiled twice.
"""
from __future__ import annotations

import jax
import numpy as np


def on_device(x, dtype=None) -> jax.Array:
    """``jnp.asarray(x, dtype)`` for host data (numpy arrays, lists, Python numbers) by a numpy cast and one
    transfer: no XLA program compiled or loaded.  A device array stays where it is (a conversion program only
    when its dtype differs)."""
    if isinstance(x, jax.Array):
        return jax.device_put(x if dtype is None or x.dtype == dtype else x.astype(dtype), jax.devices()[0])
    return jax.device_put(np.asarray(x) if dtype is None else np.asarray(x, dtype), jax.devices()[0])


def zeros_on_device(shape, dtype) -> jax.Array:
    """``jnp.zeros(shape, dtype)`` without its broadcast program."""
    return jax.device_put(np.zeros(shape, dtype), jax.devices()[0])


def array_module(*arrays):
    """numpy when no argument (arrays or pytrees of them) holds a JAX array, else ``jax.numpy`` (a device array, or
    a tracer under jit, grad or vmap, whichever argument is traced: pass every array the function computes with).
    A function written against the returned module runs on the host with no XLA program when called on numpy data
    (reports, starting values), and traces as usual otherwise.  The geometry report's restraint values were one
    more program for every problem (5kzb: 0.17 s to compile alone, 1.4 s beside the L-BFGS program's compilation in
    a cold run); in numpy they take milliseconds."""
    if any(isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(arrays)):
        import jax.numpy as jnp

        return jnp
    return np


def special_module(xp):
    """The special functions that go with the array module ``xp`` (:func:`array_module`): ``scipy.special`` for
    numpy, ``jax.scipy.special`` for ``jax.numpy`` (e.g. the exponentially scaled Bessel functions i0e, i1e)."""
    if xp is np:
        import scipy.special

        return scipy.special
    import jax.scipy.special

    return jax.scipy.special
