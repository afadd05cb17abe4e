"""Jit-compiled minimisation loops over a pytree of parameters with optax.

``minimise(fun, x0, args, n_steps)`` runs ``n_steps`` optimiser steps of ``fun(x, *args)`` inside
one ``jax.lax.while_loop``: one compilation per (function, shapes), no Python in the loop.  ``args`` are
traced arguments (the static problem's arrays), so new data never trigger a recompile.
"""
from __future__ import annotations

from functools import partial

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


@partial(jax.jit, static_argnames=("fun", "method"))
def minimise(fun, x0, args, n_steps, method: str = "lbfgs", learning_rate=0.01):
    """Minimise ``fun(x, *args)`` from ``x0``.

    Args:
        fun: a module-level (hashable, stable) function of (pytree x, *args) -> scalar.
        x0: starting pytree.
        args: tuple of pytrees passed through to ``fun`` (traced, not compile-time constants).
        n_steps: optimiser steps (traced: changing it does not recompile).
        method: "lbfgs" (zoom line search), "adam" or "sgd".
        learning_rate: step size for adam/sgd (array or float; traced).

    Returns:
        (x, value): the best point seen and its objective value.
    """
    f = lambda x: fun(x, *args)  # noqa: E731
    opt = make_optimizer(method, learning_rate)
    if method == "lbfgs":
        value_and_grad = optax.value_and_grad_from_state(f)
    else:
        value_and_grad = jax.value_and_grad(f)

    def step(carry):
        i, x, state, best_x, best_v = carry
        if method == "lbfgs":
            value, grad = value_and_grad(x, state=state)
            updates, state = opt.update(grad, state, x, value=value, grad=grad, value_fn=f)
        else:
            value, grad = value_and_grad(x)
            updates, state = opt.update(grad, state, x)
        ok = jnp.isfinite(value) & (value < best_v)
        best_x = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), x, best_x)
        best_v = jnp.where(ok, value, best_v)
        finite = jax.tree_util.tree_reduce(lambda a, b: a & b, jax.tree_util.tree_map(lambda u: jnp.all(jnp.isfinite(u)), updates))
        x = jax.tree_util.tree_map(lambda a, u: jnp.where(finite, a + u, a), x, updates)
        return i + 1, x, state, best_x, best_v

    v_dtype = jax.tree_util.tree_leaves(x0)[0].dtype
    init = (jnp.asarray(0), x0, opt.init(x0), x0, jnp.asarray(jnp.inf, dtype=v_dtype))
    _, x, state, best_x, best_v = jax.lax.while_loop(lambda c: c[0] < n_steps, step, init)
    # the last iterate has not been evaluated inside the loop: compare it too
    v_last = f(x)
    take_last = jnp.isfinite(v_last) & (v_last < best_v)
    best_x = jax.tree_util.tree_map(lambda a, b: jnp.where(take_last, a, b), x, best_x)
    return best_x, jnp.where(take_last, v_last, best_v)
