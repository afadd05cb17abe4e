"""Jit-compiled minimisation loops over a pytree of parameters with optax.

``minimise(fun, x0, args, n_steps)`` runs ``n_steps`` optimiser steps of ``fun(x, *args)`` inside
one ``jax.lax.scan``: one compilation per (function, shapes), no Python in the loop.  ``args`` are
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


@partial(jax.jit, static_argnames=("fun", "n_steps", "method"))
def minimise(fun, x0, args, n_steps: int, method: str = "lbfgs", learning_rate=0.01):
    """Minimise ``fun(x, *args)`` from ``x0``.

    Args:
        fun: a module-level (hashable, stable) function of (pytree x, *args) -> scalar.
        x0: starting pytree.
        args: tuple of pytrees passed through to ``fun`` (traced, not compile-time constants).
        n_steps: optimiser steps (static).
        method: "lbfgs" (zoom line search), "adam" or "sgd".
        learning_rate: step size for adam/sgd (array or float; traced).

    Returns:
        (x, values): the best point seen and (n_steps,) objective at each step.
    """
    f = lambda x: fun(x, *args)  # noqa: E731
    opt = make_optimizer(method, learning_rate)
    if method == "lbfgs":
        value_and_grad = optax.value_and_grad_from_state(f)
    else:
        value_and_grad = jax.value_and_grad(f)

    def step(carry, _):
        x, state, best_x, best_v = carry
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
        return (x, state, best_x, best_v), value

    init = (x0, opt.init(x0), x0, jnp.asarray(jnp.inf, dtype=jnp.result_type(float)))
    (x, state, best_x, best_v), values = jax.lax.scan(step, init, None, length=n_steps)
    # the last iterate has not been evaluated inside the loop: compare it too
    v_last = f(x)
    take_last = jnp.isfinite(v_last) & (v_last < best_v)
    best_x = jax.tree_util.tree_map(lambda a, b: jnp.where(take_last, a, b), x, best_x)
    return best_x, values
