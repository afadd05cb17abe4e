"""Jit-compiled minimisation loops over a pytree of parameters with optax.

``minimise(fun, x0, args, n_steps)`` runs up to ``n_steps`` optimiser steps of ``fun(x, *args)`` inside
one ``jax.lax.while_loop`` (fewer with ``rtol`` once the objective stops falling): one compilation per (function, shapes), no Python in the loop.  ``args`` are
traced arguments (the static problem's arrays), so new data never trigger a recompile.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

LBFGS_MEMORY = 10  # correction pairs (Nocedal & Wright 2006, sec. 7.2: 3–20 is typical)
MAX_LINESEARCH_STEPS = 12


def make_optimizer(method: str, learning_rate):
    """optax transformation for ``method`` in {lbfgs, adam, sgd}."""
    if method == "lbfgs":
        return optax.lbfgs(
            memory_size=LBFGS_MEMORY,
            linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=MAX_LINESEARCH_STEPS, initial_guess_strategy="one"),
        )
    if method == "adam":
        return optax.adam(learning_rate)
    if method == "sgd":
        return optax.sgd(learning_rate, momentum=0.9)
    raise ValueError(f"unknown optimizer {method!r}; choose lbfgs, adam or sgd")


class MinimiseStats(NamedTuple):
    """What one :func:`minimise_with_stats` call did (0-d int arrays).

    Attributes:
        steps: optimiser steps taken (fewer than asked when it converged).
        evaluations: evaluations of the objective (each with its gradient, except the last
            value-only check): the line-search trials of L-BFGS, one per step otherwise.
    """

    steps: jnp.ndarray
    evaluations: jnp.ndarray


def minimise(fun, x0, args, n_steps, method: str = "lbfgs", learning_rate=0.01, rtol=0.0):
    """Minimise ``fun(x, *args)`` from ``x0``; (x, value): the best point seen and its value.

    See :func:`minimise_with_stats` for the arguments.
    """
    x, value, _ = minimise_with_stats(fun, x0, args, n_steps, method, learning_rate, rtol)
    return x, value


@partial(jax.jit, static_argnames=("fun", "method"))
def minimise_with_stats(fun, x0, args, n_steps, method: str = "lbfgs", learning_rate=0.01, rtol=0.0):
    """Minimise ``fun(x, *args)`` from ``x0``, stopping after ``n_steps`` or on convergence.

    Args:
        fun: a module-level (hashable, stable) function of (pytree x, *args) -> scalar.
        x0: starting pytree.
        args: tuple of pytrees passed through to ``fun`` (traced, not compile-time constants).
        n_steps: largest number of optimiser steps (traced: changing it does not recompile).
        method: "lbfgs" (zoom line search), "adam" or "sgd".
        learning_rate: step size for adam/sgd (array or float; traced).
        rtol: stop once a step lowers the objective by less than ``rtol`` × |objective| (traced;
            0: run all ``n_steps``).  A relative-decrease test as in Nocedal & Wright (2006), sec. 8.3.

    Returns:
        (x, value, MinimiseStats): the best point seen, its objective value, steps and evaluations.
    """
    # one jitted objective shared by every call site (the step, the line search's trials, the
    # final check): traced and differentiated once, not once per call site
    f = jax.jit(lambda x: fun(x, *args))
    opt = make_optimizer(method, learning_rate)
    if method == "lbfgs":
        value_and_grad = optax.value_and_grad_from_state(f)
    else:
        value_and_grad = jax.value_and_grad(f)

    def step(carry):
        i, x, state, best_x, best_v, prev_v, _, n_eval = carry
        if method == "lbfgs":
            value, grad = value_and_grad(x, state=state)
            updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=f)
            n_eval = n_eval + optax.tree_utils.tree_get(state, "info").num_linesearch_steps.astype(n_eval.dtype)
        else:
            value, grad = value_and_grad(x)
            updates, state = opt.update(grad, state, x)
            n_eval = n_eval + 1
        ok = jnp.isfinite(value) & (value < best_v)
        best_x = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), x, best_x)
        best_v = jnp.where(ok, value, best_v)
        finite = jax.tree_util.tree_reduce(lambda a, b: a & b, jax.tree_util.tree_map(lambda u: jnp.all(jnp.isfinite(u)), updates))
        x = jax.tree_util.tree_map(lambda a, u: jnp.where(finite, a + u, a), x, updates)
        converged = (rtol > 0) & (i > 0) & (prev_v - value <= rtol * jnp.abs(value))
        return i + 1, x, state, best_x, best_v, value.astype(v_dtype), converged, n_eval

    v_dtype = jax.tree_util.tree_leaves(x0)[0].dtype
    inf = jnp.asarray(jnp.inf, dtype=v_dtype)
    zero = jnp.asarray(0, jnp.int32)
    # the first L-BFGS step evaluates f at x0 itself; later ones reuse the line search's value
    init = (zero, x0, opt.init(x0), x0, inf, inf, jnp.asarray(False), zero + (1 if method == "lbfgs" else 0))
    i, x, state, best_x, best_v, _, _, n_eval = jax.lax.while_loop(lambda c: (c[0] < n_steps) & ~c[6], step, init)
    # the last iterate has not been evaluated inside the loop: compare it too
    v_last = f(x)
    take_last = jnp.isfinite(v_last) & (v_last < best_v)
    best_x = jax.tree_util.tree_map(lambda a, b: jnp.where(take_last, a, b), x, best_x)
    return best_x, jnp.where(take_last, v_last, best_v), MinimiseStats(i, n_eval + 1)
