"""Minimisation over parameter blocks: which blocks a strategy refines, and one minimisation.

Each block ("xyz", "b", "occ", "rigid") is minimised in turn by the same compiled L-BFGS loop
(:func:`jaxrefine.refine.optimize.minimise` over the masked shifts of
:mod:`jaxrefine.refine.energy`), so switching blocks never recompiles.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from ..problem.params import Params
from ..problem.problem import Problem, XrayState, pad_reflections
from .energy import SHIFT_ENERGY, apply_shifts, block_mask, zero_shifts
from ..core import timing
from .optimize import minimise_with_stats, prepare_minimiser
from .gauss_newton import CG_RTOL, MAX_CG, gauss_newton_steps
from ..core.cache import call_exported, prepare_exported
from ..core.device import on_device, zeros_on_device

apply_shifts_jit = jax.jit(apply_shifts)  # host code: one program, not one per operation

STRATEGY_BLOCKS = {
    "rigid": ("rigid",),
    "xyz": ("xyz",),
    "b": ("b",),
    "xyz_b": ("xyz", "b"),
    "xyz_b_occ": ("xyz", "b", "occ"),
}


# Coordinates and B in one minimisation (refine.joint_xyz_b auto) where the data reach beyond JOINT_D_MAX.  Shaken
# starts, 5 macrocycles, B shifts x30 (refine.b_shift_scale; the L-BFGS scales all variables by one number, so B in Å² and
# coordinates in Å need this diagonal preconditioner: x1 left B almost unrefined, R-free 0.319 on 4xof; x10 0.191,
# x100 0.186, x30 0.177): 25 joint steps per cycle against 25 coordinate + 15 B steps gave R-free 4xof 0.1781 -> 0.1774
# with 200 -> 124 F evaluations, 5orl 0.2174 -> 0.2156 (182 -> 134), 1l2h 0.2650 -> 0.2652 (196 -> 134), 4iid
# 0.1964 -> 0.1964 (117 -> 89); 20 joint steps instead of 25: 0.0012-0.0015 higher on 4xof, 1l2h, 5orl.  At 2.9-3.2 Å
# it lost R-free (5kzb 0.2507 -> 0.2624 at x30, 0.2596 at x60, 0.2582 at x120, 0.2611 at x250, 0.2757 at x15;
# 1va7 0.2714 -> 0.2724), also with the TLS shifts scaled apart from the residual B's x30 (TLS x1 0.2750, x5 0.2687,
# x200 0.2774, x1000 0.2801): there B is refined on its own after the w_A scan, as before.
JOINT_D_MAX = 2.5  # Å


def joint_applies(setting: str, d_min: float) -> bool:
    """Whether coordinates and B are minimised together: ``refine.joint_xyz_b`` on, or auto and d_min < JOINT_D_MAX."""
    return setting == "on" or (setting == "auto" and d_min < JOINT_D_MAX)


# When a minimisation stops (refine.converge_rtol auto): once a step lowers the energy by less than this fraction of
# it.  Shaken starts, 5 macrocycles, 2 cores (benchmarks/README.md run x): the joint minimisation at 1e-4 instead of
# 1e-5 reached R-free 4xof 0.1770 (0.1779 at 1e-5) with 91 F evaluations (134), 1l2h 0.2643 (0.2652) with 83 (133),
# 5orl 0.2165 (0.2156; 5e-5: 0.2162 with 101) with 87 (134), 4iid 0.1968 (0.1967), 5e5z the same model: a third less
# time.  The separate coordinate and B blocks at 2.9-3.2 Å need the tighter test: 5kzb 0.3006 at 1e-4 and 0.2528 at
# 3e-5 against 0.2507, 1va7 0.2722 against 0.2714.  It is the TLS and residual-B block that stops too early (loosened
# alone: 5kzb 0.2931); the coordinate block loosened alone gave 5kzb 0.2612, 1va7 0.2689; the w_A scan trials no change.
CONVERGE_RTOL_JOINT = 1e-4
CONVERGE_RTOL_BLOCKS = 1e-5


def converge_rtol_for(setting, joint: bool) -> float:
    """``refine.converge_rtol``: the number, or for auto CONVERGE_RTOL_JOINT where coordinates and B are minimised
    together (``joint``, :func:`joint_applies`), else CONVERGE_RTOL_BLOCKS."""
    if setting != "auto":
        return float(setting)
    return CONVERGE_RTOL_JOINT if joint else CONVERGE_RTOL_BLOCKS


def cycle_plan(strategy: str, n_cycles: int, rigid_first: bool = False, n_rigid_cycles: int = 0) -> list:
    """The blocks of each macrocycle: optional rigid-body cycles first, then ``n_cycles`` of the strategy."""
    plan = []
    if rigid_first and strategy != "rigid":
        plan += [STRATEGY_BLOCKS["rigid"]] * n_rigid_cycles
    return plan + [STRATEGY_BLOCKS[strategy]] * n_cycles


def low_resolution_work_set(problem: Problem, d, d_min: float, d_cut: float | None) -> Problem:
    """The problem with the work set limited to d >= ``d_cut`` (Å; low-resolution data give rigid-body
    refinement a wide radius of convergence; same shapes, so no recompile).

    Args:
        d: (n_refl,) resolution of each reflection (Å); d_min: the data's limit.
    """
    if not d_cut or d_cut <= d_min:
        return problem
    low = on_device(pad_reflections(np.asarray(d) >= d_cut, problem.xray.work.shape[0]))  # pads: not work anyway
    return problem._replace(xray=problem.xray._replace(work=problem.xray.work & low))


def _loop_args(learning_rate: float, rtol: float, dtype):
    """The traced scalars of the minimiser, always of the same kinds (so that every call shares one executable);
    cast on the host (core/device.py: no conversion program)."""
    return on_device(learning_rate, dtype), on_device(rtol, dtype)


def minimise_blocks(blocks, params: Params, problem: Problem, state: XrayState, n_steps: int, target: str = "ml",
                    optimizer: str = "lbfgs", learning_rate: float = 0.02, rtol: float = 0.0,
                    b_scale: float = 1.0) -> Params:
    """Minimise E_total over the given parameter blocks (one jit-compiled loop for all blocks: L-BFGS,
    or optax's adam / sgd).

    Args:
        blocks: names of the free blocks, e.g. ("xyz",), or ("xyz", "b") for a joint minimisation.
        n_steps: largest number of optimiser steps (0: the parameters unchanged).
        target: "ml" or "ls"; optimizer: "lbfgs", "adam" or "sgd"; learning_rate: adam/sgd step.
        rtol: stop once a step lowers the energy by less than this fraction (0: all ``n_steps``).
        b_scale: Å² of B per unit shift of the minimiser (:func:`jaxrefine.refine.energy.block_mask`; traced
            like the mask, so any value shares the compiled loop).
    """
    return minimise_blocks_each(blocks, params, problem, (state,), n_steps, target, optimizer, learning_rate, rtol,
                                b_scale)[0]


# The minimisations of minimise_blocks_each run on threads of their own: XLA's CPU client runs the programs one
# thread dispatches one after the other, and one minimisation keeps ~1.3 of 2 cores busy (its FFTs run on one
# core; benchmarks/README.md), so programs dispatched from two threads side by side fill the idle core.  The w_A
# scan's three trials of 10 coordinate steps: 5kzb 0.40 -> 0.30 s, 1va7 1.0 -> 0.81 s, iterates identical.
def minimise_blocks_each(blocks, params: Params, problem: Problem, states, n_steps: int, target: str = "ml",
                         optimizer: str = "lbfgs", learning_rate: float = 0.02, rtol: float = 0.0,
                         b_scale: float = 1.0) -> list:
    """:func:`minimise_blocks` from the same ``params`` once per X-ray state of ``states`` (e.g. the trial
    weights of a w_A scan), the minimisations side by side (threads of their own, see above): a list of Params,
    one per state, each as :func:`minimise_blocks` returns it."""
    if n_steps <= 0:
        return [params for _ in states]
    mask = block_mask(params, blocks, b_scale)
    lr, rtol_a = _loop_args(learning_rate, rtol, problem.maps.orth.dtype)

    def run(state):
        return minimise_with_stats(SHIFT_ENERGY[target], zero_shifts(params), (mask, params, problem, state),
                                   n_steps=n_steps, method=optimizer, learning_rate=lr, rtol=rtol_a)

    if len(states) == 1:
        runs = [run(states[0])]
    else:
        with ThreadPoolExecutor(len(states), thread_name_prefix="jaxrefine-minimise") as pool:
            runs = list(pool.map(run, states))
    out = []
    for shifts, _, stats in runs:  # counted here, on the caller's thread (the recorder is not shared)
        timing.count("steps", stats.steps)  # waits for the minimisation (timing sections stay honest)
        timing.count("evaluations", stats.evaluations)
        out.append(apply_shifts_jit(shifts, mask, params, problem))
    return out


# refine.gn_steps auto (4iid, 14 782 atoms, 2.3 Å, shaken start, 5 macrocycles): L-BFGS 25 joint steps per cycle:
# R-free 0.1964, 89 F evaluations, optimiser 23.6 s of 39.5 s; 4 Gauss-Newton steps and no L-BFGS: 0.1966, 25
# evaluations, 13.8 s of 30.7 s; 6: 0.1962, 34, 17.6 s; 4 + 5 L-BFGS steps: 0.1957, 54.  Small models gain little
# per evaluation and would compile a second program (cold start), and anisotropic or TLS B are not in the step.
GN_AUTO_STEPS = 4
GN_AUTO_MIN_ATOMS = 5000


def gauss_newton_plan(setting, steps_xyz: int, joint: bool, iso: bool, with_occ: bool, n_atoms: int, d_min: float,
                      target: str, optimizer: str) -> tuple:
    """(Gauss-Newton steps, L-BFGS steps) of a macrocycle's coordinate minimisation for ``refine.gn_steps``
    (a number: that many, then ``steps_xyz`` L-BFGS steps; auto: GN_AUTO_STEPS and none where coordinates and
    isotropic B are minimised together (``joint``, ``iso``), no occupancies ride along, the model has at least
    GN_AUTO_MIN_ATOMS atoms, and the target is ML with the L-BFGS optimiser; else none and ``steps_xyz``)."""
    if optimizer != "lbfgs":
        return 0, steps_xyz
    if setting != "auto":
        return int(setting), steps_xyz
    if joint and iso and not with_occ and n_atoms >= GN_AUTO_MIN_ATOMS and target == "ml" and d_min < JOINT_D_MAX:
        return GN_AUTO_STEPS, 0
    return 0, steps_xyz


_gauss_newton_jit = jax.jit(gauss_newton_steps, static_argnames=("target", "with_b"))


def gauss_newton_block(params: Params, problem: Problem, state: XrayState, n_steps: int, target: str = "ml",
                       rtol: float = 0.0, with_b: bool = False, calibration=None):
    """Up to ``n_steps`` Gauss-Newton steps of the coordinates, with ``with_b`` also of isotropic B
    (:func:`jaxrefine.refine.gauss_newton.gauss_newton_steps`), one compiled program per problem (kept in the
    compilation cache folder like the L-BFGS loop's).  ``calibration``: an earlier call's, reused (None: measured).
    Returns (params, calibration): measured once per refinement, 4 F_model evaluations (4iid: 0.4 s) a macrocycle less."""
    if n_steps <= 0:
        return params, calibration
    params, stats = call_exported(_gauss_newton_jit, _gauss_newton_args(params, problem, state, n_steps, rtol, calibration),
                                  {"target": target, "with_b": with_b}, "gauss_newton")
    timing.count("steps", stats.steps)
    timing.count("evaluations", stats.evaluations)
    timing.count("gn_cg_iterations", stats.cg_iterations)
    return params, np.asarray(stats.calibration)


def _gauss_newton_args(params, problem, state, n_steps: int, rtol: float, calibration) -> tuple:
    """The array arguments of the Gauss-Newton program (its numbers traced: one program for every call)."""
    dt = problem.maps.orth.dtype
    given = np.zeros(2, dt) if calibration is None else np.asarray(calibration, dt)
    return (params, problem, state, np.int32(n_steps), np.int32(MAX_CG), np.asarray(CG_RTOL, dt), np.asarray(rtol, dt),
            given)


def prepare_gauss_newton(params: Params, problem: Problem, state, target: str = "ml", with_b: bool = False):
    """Start compiling the Gauss-Newton program of :func:`gauss_newton_block` on a background thread (as
    :func:`prepare_block_minimiser` does the L-BFGS loop's), for refinements whose macrocycles take Gauss-Newton
    steps only (4iid); ``state`` may be shapes.  Returns the Future or None."""
    return prepare_exported(_gauss_newton_jit, _gauss_newton_args(params, problem, state, 0, 0.0, None),
                            {"target": target, "with_b": with_b}, "gauss_newton")


def prepare_block_minimiser(params: Params, problem: Problem, state, target: str = "ml"):
    """Start compiling the L-BFGS program of :func:`minimise_blocks` and :func:`xray_gradient_norm` on a
    background thread; ``state`` may be :func:`jaxrefine.problem.xray_state.xray_state_spec`'s shapes
    (see :func:`jaxrefine.refine.optimize.prepare_minimiser`).  Returns the Future or None."""
    lr, rtol_a = _loop_args(0.02, 0.0, problem.maps.orth.dtype)
    return prepare_minimiser(SHIFT_ENERGY[target], zero_shifts(params), (block_mask(params, ("xyz",)), params, problem, state),
                             method="lbfgs", learning_rate=lr, rtol=rtol_a)


def xray_gradient_norm(params: Params, problem: Problem, state: XrayState, target: str = "ml",
                       gauss_newton_with_b: bool | None = None) -> float:
    """‖∂E_xray/∂x‖ over Cartesian coordinate shifts (Å) at the parameters (the start of the automatic w_A).

    Evaluated by a program the refinement compiles anyway, with no steps and w_A = 0 (E_total is then E_xray plus
    the ADP restraints, which do not depend on coordinates): the L-BFGS loop, or, where the macrocycles take
    Gauss-Newton steps only (``gauss_newton_with_b``: that program's ``with_b``), the Gauss-Newton program: a
    cold 4iid run then compiles no L-BFGS loop at all.
    """
    state0 = state._replace(w_a=zeros_on_device(state.w_a.shape, state.w_a.dtype))
    if gauss_newton_with_b is not None:
        dt = problem.maps.orth.dtype
        _, stats = call_exported(_gauss_newton_jit, _gauss_newton_args(params, problem, state0, 0, 0.0, np.ones(2, dt)),
                                 {"target": target, "with_b": gauss_newton_with_b}, "gauss_newton")
        return float(stats.grad_norm_start)
    lr, rtol_a = _loop_args(0.02, 0.0, problem.maps.orth.dtype)
    _, _, stats = minimise_with_stats(SHIFT_ENERGY[target], zero_shifts(params), (block_mask(params, ("xyz",)), params, problem, state0),
                                      n_steps=0, method="lbfgs", learning_rate=lr, rtol=rtol_a)
    return float(stats.grad_norm)
