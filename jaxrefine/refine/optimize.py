"""Jit-compiled minimisation loops over a pytree of parameters: L-BFGS, or optax's adam / sgd.

``minimise(fun, x0, args, n_steps)`` runs up to ``n_steps`` optimiser steps of ``fun(x, *args)`` inside
one ``jax.lax.while_loop`` (fewer with ``rtol`` once the objective stops falling): one compilation per (function, shapes), no Python in the loop.  ``args`` are
traced arguments (the static problem's arrays), so new data never trigger a recompile.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ..core.cache import call_exported, prepare_exported

LBFGS_MEMORY = 10  # correction pairs (Nocedal & Wright 2006, sec. 7.2: 3–20 is typical)
# The convergence test (rtol) may stop a minimisation from its MIN_STEPS-th accepted step on, not before.  |E| is
# mostly the X-ray term's large constant, so after the w_A steering raises the weight the first steps' decreases are
# small against it, and a minimisation that stopped after two steps left the geometry where the steering meant to
# move it: 1l2h from its shaken start ended at RMS angle 2.06° (cycles 4 and 5: 4 and 2 steps); with the floor
# 1.90° and R-free 0.2641 (0.2640) for 90 F evaluations instead of 82, 4xof 1.86° (1.90°) and 0.1769 (0.1767)
# for 99 instead of 96 (benchmarks/README.md, session 26).
MIN_STEPS = 5


def make_optimizer(method: str, learning_rate):
    """optax transformation for ``method`` in {adam, sgd}; None for lbfgs (its loop is :func:`lbfgs_loop`)."""
    if method == "lbfgs":
        return None
    import optax  # here: the default L-BFGS does not need it, and importing it takes ~0.12 s of every start

    if method == "adam":
        return optax.adam(learning_rate)
    if method == "sgd":
        return optax.sgd(learning_rate, momentum=0.9)
    raise ValueError(f"unknown optimizer {method!r}; choose lbfgs, adam or sgd")


class MinimiseStats(NamedTuple):
    """What one :func:`minimise_with_stats` call did (0-d int arrays).

    Attributes:
        steps: optimiser steps taken (fewer than asked when it converged).
        evaluations: evaluations of the objective with its gradient: the line-search trials of
            L-BFGS (the start included), one per step plus a last value-only check otherwise.
        grad_norm: Euclidean norm of the gradient at the returned point (L-BFGS; nan otherwise).
            With ``n_steps=0`` L-BFGS only evaluates the start: a gradient from the loop's
            compiled code, no other compilation.
    """

    steps: jnp.ndarray
    evaluations: jnp.ndarray
    grad_norm: jnp.ndarray  # ‖gradient‖ at the returned point (L-BFGS; nan for adam / sgd)


def minimise(fun, x0, args, n_steps, method: str = "lbfgs", learning_rate=0.01, rtol=0.0):
    """Minimise ``fun(x, *args)`` from ``x0``; (x, value): the best point seen and its value.

    See :func:`minimise_with_stats` for the arguments.
    """
    x, value, _ = minimise_with_stats(fun, x0, args, n_steps, method, learning_rate, rtol)
    return x, value


def minimise_with_stats(fun, x0, args, n_steps, method: str = "lbfgs", learning_rate=0.01, rtol=0.0):
    """Minimise ``fun(x, *args)`` from ``x0``, stopping after ``n_steps`` or on convergence.

    One compiled program per (``fun``, ``method``, shapes); its lowered form is kept in the compilation
    cache folder (:func:`jaxrefine.core.cache.call_exported`), so a warm run does not trace it again.

    Args:
        fun: a module-level (hashable, stable) function of (pytree x, *args) -> scalar.
        x0: starting pytree.
        args: tuple of pytrees passed through to ``fun`` (traced, not compile-time constants).
        n_steps: largest number of optimiser steps (traced: changing it does not recompile).
        method: "lbfgs" (:func:`lbfgs_loop`), "adam" or "sgd".
        learning_rate: step size for adam/sgd (array or float; traced).
        rtol: stop once a step lowers the objective by less than ``rtol`` × |objective| (traced;
            0: run all ``n_steps``).  A relative-decrease test as in Nocedal & Wright (2006), sec. 8.3.

    Returns:
        (x, value, MinimiseStats): the best point seen, its objective value, steps and evaluations.
    """
    return call_exported(_minimise_jit, (x0, args, n_steps, learning_rate, rtol), {"fun": fun, "method": method},
                         "minimise_with_stats")


def prepare_minimiser(fun, x0, args, method: str = "lbfgs", learning_rate=0.01, rtol=0.0):
    """Start compiling :func:`minimise_with_stats`'s program for arguments shaped like these (``args`` may hold
    ``jax.ShapeDtypeStruct`` leaves for values not computed yet) on a background thread
    (:func:`jaxrefine.core.cache.prepare_exported`); its first call waits for it.  Returns the Future or None."""
    return prepare_exported(_minimise_jit, (x0, args, 0, learning_rate, rtol), {"fun": fun, "method": method},
                            "minimise_with_stats")


@partial(jax.jit, static_argnames=("fun", "method"))
def _minimise_jit(x0, args, n_steps, learning_rate, rtol, *, fun, method: str):
    """The compiled body of :func:`minimise_with_stats`."""
    if method == "lbfgs":  # one call site: the objective traced straight into its linearisation
        return lbfgs_loop(jax.value_and_grad(lambda x: fun(x, *args)), x0, n_steps, rtol)
    # one jitted objective shared by every call site: traced and differentiated once
    f = jax.jit(lambda x: fun(x, *args))
    opt = make_optimizer(method, learning_rate)
    value_and_grad = jax.value_and_grad(f)

    def step(carry):
        i, x, state, best_x, best_v, prev_v, _, n_eval = carry
        value, grad = value_and_grad(x)
        updates, state = opt.update(grad, state, x)
        ok = jnp.isfinite(value) & (value < best_v)
        best_x = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), x, best_x)
        best_v = jnp.where(ok, value, best_v)
        finite = jax.tree_util.tree_reduce(lambda a, b: a & b, jax.tree_util.tree_map(lambda u: jnp.all(jnp.isfinite(u)), updates))
        x = jax.tree_util.tree_map(lambda a, u: jnp.where(finite, a + u, a), x, updates)
        converged = (rtol > 0) & (i + 1 >= MIN_STEPS) & (prev_v - value <= rtol * jnp.abs(value))
        return i + 1, x, state, best_x, best_v, value.astype(v_dtype), converged, n_eval + 1

    v_dtype = jax.tree_util.tree_leaves(x0)[0].dtype
    inf = jnp.asarray(jnp.inf, dtype=v_dtype)
    zero = jnp.asarray(0, jnp.int32)
    init = (zero, x0, opt.init(x0), x0, inf, inf, jnp.asarray(False), zero)
    i, x, state, best_x, best_v, _, _, n_eval = jax.lax.while_loop(lambda c: (c[0] < n_steps) & ~c[6], step, init)
    # the last iterate has not been evaluated inside the loop: compare it too
    v_last = f(x)
    take_last = jnp.isfinite(v_last) & (v_last < best_v)
    best_x = jax.tree_util.tree_map(lambda a, b: jnp.where(take_last, a, b), x, best_x)
    return best_x, jnp.where(take_last, v_last, best_v), MinimiseStats(i, n_eval + 1, jnp.asarray(jnp.nan, v_dtype))


# ------------------------------------------------------------------------------------ L-BFGS
# L-BFGS (Nocedal 1980; Nocedal & Wright 2006, algorithm 7.4) with a backtracking Armijo line
# search (N&W algorithm 3.1, quadratic interpolation safeguarded to [0.1, 0.5] of the last trial,
# sec. 3.5), written so that the objective is evaluated at exactly one place of the compiled
# loop: each iteration evaluates one trial point and then either accepts it (a step) or shortens
# the step.  XLA inlines every call site of a jitted function, so a loop with the evaluation in
# one place compiles in about the time of one gradient; optax's L-BFGS with its zoom line search
# evaluates at three places and compiled ~3x longer (1va7: 34 s vs 12 s for one gradient).
ARMIJO_C1 = 1e-4  # sufficient decrease (N&W sec. 3.1)
MAX_BACKTRACKS = 10  # shortenings of one step before the memory is dropped (then steepest descent)
FIRST_SHIFT = 0.1  # largest component of the first trial step (Å for coordinates); later steps are L-BFGS-scaled
CURVATURE_EPS = 1e-10  # a pair (s, y) is kept when sᵀy > CURVATURE_EPS · yᵀy (N&W sec. 7.2)


class _LbfgsCarry(NamedTuple):
    i: jnp.ndarray  # accepted steps
    n_eval: jnp.ndarray
    x: jnp.ndarray  # accepted point (flat), its value and gradient
    fx: jnp.ndarray
    gx: jnp.ndarray
    d: jnp.ndarray  # search direction
    alpha: jnp.ndarray  # trial step length along d
    s_mem: jnp.ndarray  # (m, n) ring buffers of the last m pairs
    y_mem: jnp.ndarray
    rho: jnp.ndarray  # (m,) 1/sᵀy, 0 for empty slots
    k: jnp.ndarray  # pairs written so far (the newest is at (k-1) % m)
    gamma: jnp.ndarray  # initial Hessian scale sᵀy/yᵀy of the newest pair
    n_back: jnp.ndarray  # shortenings of the current step
    started: jnp.ndarray  # x0 has been evaluated
    done: jnp.ndarray


def _two_loop(g, s_mem, y_mem, rho, k, gamma):
    """−H·g by the L-BFGS two-loop recursion over the stored pairs (empty slots have rho 0)."""
    m = rho.shape[0]

    def newest_first(j, carry):
        q, a = carry
        idx = (k - 1 - j) % m
        aj = rho[idx] * jnp.dot(s_mem[idx], q)
        return q - aj * y_mem[idx], a.at[idx].set(aj)

    q, a = jax.lax.fori_loop(0, m, newest_first, (g, jnp.zeros_like(rho)))
    r = gamma * q

    def oldest_first(j, r):
        idx = (k + j) % m
        return r + s_mem[idx] * (a[idx] - rho[idx] * jnp.dot(y_mem[idx], r))

    return -jax.lax.fori_loop(0, m, oldest_first, r)


def _steepest(g):
    """−g scaled so that its largest component is FIRST_SHIFT (a first step of sensible length)."""
    big = jnp.max(jnp.abs(g))
    return -g * jnp.where(big > 0, FIRST_SHIFT / jnp.where(big > 0, big, 1.0), 0.0)


def lbfgs_loop(value_and_grad, x0, n_steps, rtol=0.0, memory: int = LBFGS_MEMORY):
    """L-BFGS with one evaluation of ``value_and_grad`` per loop iteration (see the note above).

    Args:
        value_and_grad: pytree x -> (value, gradient pytree).
        x0: starting pytree.
        n_steps: largest number of accepted steps (traced).
        rtol: stop once a step lowers the value by less than rtol × |value|, from the MIN_STEPS-th step on (traced;
            0: never).
        memory: correction pairs kept.

    Returns:
        (x, value, MinimiseStats): every accepted step lowers the value, so x is the best point seen.
        The loop also stops when no step along a steepest-descent direction lowers the value
        (converged to the precision of the arithmetic) or the gradient is zero.
    """
    flat0, unravel = ravel_pytree(x0)
    dtype = flat0.dtype
    n = flat0.shape[0]

    def vg(flat):
        v, g = value_and_grad(unravel(flat))
        return v.astype(dtype), ravel_pytree(g)[0].astype(dtype)

    def first(c, ft, gt, ok):  # x0 evaluated: set up the first step
        return c._replace(fx=jnp.where(ok, ft, jnp.inf).astype(dtype), gx=gt, d=_steepest(gt), alpha=jnp.ones((), dtype),
                          started=jnp.asarray(True), done=~ok | ~jnp.any(gt != 0))

    def accept(c, ft, gt, ok):
        xt = c.x + c.alpha * c.d
        s, y = xt - c.x, gt - c.gx
        sy, yy = jnp.dot(s, y), jnp.dot(y, y)
        good = (sy > CURVATURE_EPS * yy) & (yy > 0)
        slot = c.k % memory
        s_mem = jnp.where(good, c.s_mem.at[slot].set(s), c.s_mem)
        y_mem = jnp.where(good, c.y_mem.at[slot].set(y), c.y_mem)
        rho = jnp.where(good, c.rho.at[slot].set(1.0 / jnp.where(good, sy, 1.0)), c.rho)
        k = c.k + good.astype(c.k.dtype)
        gamma = jnp.where(good, sy / jnp.where(good, yy, 1.0), c.gamma)
        d = _two_loop(gt, s_mem, y_mem, rho, k, gamma)
        descent = (k > 0) & (jnp.dot(gt, d) < 0) & jnp.all(jnp.isfinite(d))
        d = jnp.where(descent, d, _steepest(gt))
        rho = jnp.where(descent, rho, jnp.zeros_like(rho))  # not a descent direction: drop the memory
        k = jnp.where(descent, k, 0)
        converged = (rtol > 0) & (c.i + 1 >= MIN_STEPS) & (c.fx - ft <= rtol * jnp.abs(ft))
        return c._replace(i=c.i + 1, x=xt, fx=ft, gx=gt, d=d, alpha=jnp.ones((), dtype), s_mem=s_mem, y_mem=y_mem,
                          rho=rho, k=k, gamma=gamma, n_back=jnp.zeros((), jnp.int32),
                          done=converged | ~jnp.any(gt != 0))

    def shorten(c, ft, gt, ok):
        g0d = jnp.dot(c.gx, c.d)
        curv = ft - c.fx - c.alpha * g0d  # > 0 when the Armijo test failed
        a_q = -g0d * c.alpha**2 / (2.0 * jnp.where(curv > 0, curv, 1.0))
        alpha = jnp.where(ok & (curv > 0), jnp.clip(a_q, 0.1 * c.alpha, 0.5 * c.alpha), 0.1 * c.alpha)
        n_back = c.n_back + 1
        give_up = n_back >= MAX_BACKTRACKS
        restart = give_up & (c.k > 0)  # drop the memory once and try steepest descent
        return c._replace(alpha=jnp.where(give_up, jnp.ones((), dtype), alpha).astype(dtype),
                          d=jnp.where(restart, _steepest(c.gx), c.d),
                          rho=jnp.where(restart, jnp.zeros_like(c.rho), c.rho), k=jnp.where(restart, 0, c.k),
                          n_back=jnp.where(give_up, 0, n_back), done=give_up & (c.k == 0))

    def body(c):
        ft, gt = vg(c.x + c.alpha * c.d)
        ok = jnp.isfinite(ft) & jnp.all(jnp.isfinite(gt))
        armijo = ok & (ft <= c.fx + ARMIJO_C1 * c.alpha * jnp.dot(c.gx, c.d))
        branch = jnp.where(~c.started, 0, jnp.where(armijo, 1, 2))
        c = jax.lax.switch(branch, (first, accept, shorten), c, ft, gt, ok)
        return c._replace(n_eval=c.n_eval + 1)

    zero_i = jnp.zeros((), jnp.int32)
    init = _LbfgsCarry(i=zero_i, n_eval=zero_i, x=flat0, fx=jnp.asarray(jnp.inf, dtype), gx=jnp.zeros_like(flat0),
                       d=jnp.zeros_like(flat0), alpha=jnp.zeros((), dtype), s_mem=jnp.zeros((memory, n), dtype),
                       y_mem=jnp.zeros((memory, n), dtype), rho=jnp.zeros((memory,), dtype), k=zero_i,
                       gamma=jnp.ones((), dtype), n_back=zero_i, started=jnp.asarray(False), done=jnp.asarray(False))
    c = jax.lax.while_loop(lambda c: ~c.started | ((c.i < n_steps) & ~c.done), body, init)
    return unravel(c.x), c.fx, MinimiseStats(c.i, c.n_eval, jnp.linalg.norm(c.gx))
