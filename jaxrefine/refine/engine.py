"""The macrocycle loop: minimise (inside jit), then refresh the X-ray state (outside jit).

    setup = build_setup(model_path, data_path, config)       # jaxrefine.problem
    result = refine(setup)                                    # RefinementResult(params, state, history, ...)
    write_outputs(result, setup, "out/")                      # jaxrefine.refine.outputs

Each macrocycle: rebuild the neighbour list; minimise each parameter block of the strategy
(:mod:`jaxrefine.refine.blocks`); run the caller's ``after_minimise`` actions; refit mask, scales
and σA (:func:`jaxrefine.problem.xray_state.update_xray_state`); report
(:mod:`jaxrefine.refine.monitor`); let the guard warn and keep the best model
(:mod:`jaxrefine.refine.guard`); run the caller's ``between_cycles`` actions; steer w_A
(:mod:`jaxrefine.refine.weights`).  The configuration is read once, into :class:`LoopSettings`.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config
from ..core import timing
from ..problem.params import Params
from ..problem.problem import Problem, Setup, XrayState
from ..problem.setup import build_setup, choose_strategy, uses_rigid_bodies, with_rigid_bodies
from ..problem.riding import riding_problem
from ..problem.xray_state import (current_model_arrays, f_model_on_host, mask_moved, model_of, moved_beyond, refit_xray_state,
                                  mask_ahead_pays, refresh_neighbours, start_f_mask)
from ..xray.targets import ml_amplitude_target
from . import weights as wmod
from ..core.cache import enable_compilation_cache
from ..core.device import on_device
from .energy import block_mask, zero_shifts
from .blocks import (GN_AUTO_MIN_ATOMS, JOINT_D_MAX, STRATEGY_BLOCKS, apply_shifts_jit, converge_rtol_for, cycle_plan, gauss_newton_block, gauss_newton_plan, joint_applies, low_resolution_work_set, minimise_blocks, minimise_blocks_each,  # noqa: F401 (STRATEGY_BLOCKS re-exported)
                     prepare_block_minimiser, prepare_gauss_newton, xray_gradient_norm)
from .guard import Kept, keep_better, overfitting_warnings, stop_for_rising_r_free, within_limits
from .monitor import HEADER, CycleStats, converged, cycle_statistics, format_cycle, log_cycle  # noqa: F401 (re-exported)

log = logging.getLogger("jaxrefine")

# The riding hydrogens are re-placed only once some atom has moved this far (Å) since the last time: their frames
# barely change below it.  4iid's fourth and fifth macrocycles move atoms at most 0.05 and 0.01 Å (RMS 0.008 and
# 0.001) and re-placed 12.5k hydrogens (0.16 s) each time.  (The solvent mask has its own rule: xray_state.mask_moved.)
REBUILD_SHIFT = 0.1


class LoopSettings(NamedTuple):
    """The options the loop reads, taken from the configuration once (:meth:`from_config`)."""

    strategy: str
    n_cycles: int
    rigid_first: bool
    n_rigid_cycles: int
    steps: dict  # block -> optimiser steps per macrocycle
    gn_steps: Any  # refine.gn_steps: Gauss-Newton steps before each coordinate minimisation (blocks.gauss_newton_plan)
    d_min: float
    joint: bool  # coordinates and B in one minimisation of steps["xyz"] steps (blocks.joint_applies)
    b_scale: float  # Å² of B per unit shift in the joint minimisation
    target: str
    optimizer: str
    learning_rate: float
    converge_rtol: float  # a block stops once a step lowers E by less than this fraction
    converge_shift: float  # Å: the macrocycles stop once one moves the atoms less than this RMS (monitor.converged)
    rigid_d_min: float | None
    rigid_target: str  # X-ray target of the rigid-body block
    mask_every: int  # macrocycles between solvent-mask rebuilds
    w_a: Any  # a number, or "auto"
    target_rmsz: float  # RMS Z(bond) the automatic w_A aims at
    scan_w_a: bool  # choose w_A each macrocycle by a short scan (automatic weight, low resolution)
    max_gap: float
    keep_best: bool
    keep_input: bool  # the input model competes with the refined cycles (with keep_best)
    stop_after_rises: int  # stop once R-free has risen in this many cycles in a row (guard.stop_for_rising_r_free)

    @classmethod
    def from_config(cls, cfg: Config, d_min: float, n_cycles: int | None = None, strategy: str | None = None):
        r = cfg.refine
        joint = joint_applies(r.joint_xyz_b, d_min)
        return cls(
            strategy=strategy or r.strategy, n_cycles=r.n_cycles if n_cycles is None else n_cycles,
            rigid_first=r.rigid_first, n_rigid_cycles=r.n_rigid_cycles,
            steps={"xyz": r.steps_xyz, "b": r.steps_b, "occ": r.steps_occ, "rigid": r.steps_rigid},
            gn_steps=r.gn_steps, d_min=d_min,
            joint=joint, b_scale=r.b_shift_scale,
            target=r.target, optimizer=r.optimizer, learning_rate=r.learning_rate,
            converge_rtol=converge_rtol_for(r.converge_rtol, joint),
            converge_shift=r.converge_shift,
            rigid_d_min=r.rigid_d_min, rigid_target=r.rigid_target,
            mask_every=max(cfg.solvent.update_every, 1), w_a=cfg.weights.w_a,
            target_rmsz=wmod.target_rmsz_for(d_min, cfg.weights.target_rmsz_bond),
            scan_w_a=wmod.scan_applies(cfg.weights.w_a, d_min),
            max_gap=cfg.guard.max_gap, keep_best=cfg.guard.keep_best,
            keep_input=cfg.guard.keep_input, stop_after_rises=cfg.guard.stop_after_rises,
        )


class CycleContext(NamedTuple):
    """What a between-cycle action sees and returns (``hook(ctx) -> ctx._replace(...)``).

    Actions are handed to :func:`refine` by the caller (``refine`` imports no analysis code):
    ``after_minimise`` actions run after the minimisation of a macrocycle, before the X-ray state
    is refitted, and must keep every array shape (e.g. zero the occupancy of a bad water);
    ``between_cycles`` actions run after the cycle's statistics and may return a new ``setup``
    with its own problem, params and state (atoms added or removed), which restarts the
    comparison of models by R-free.

    Attributes:
        cycle: the macrocycle just run (1-based); last: whether it is the final one.
        blocks: the parameter blocks it refined ("xyz", "b", "occ", "rigid").
        setup, params, problem, state: the current refinement.
        removed: labels of atoms the action removed (occupancy 0; the writers leave them out).
    """

    cycle: int
    last: bool
    blocks: tuple
    setup: Setup
    params: Params
    problem: Problem
    state: XrayState
    removed: tuple = ()


class RefinementResult(NamedTuple):
    """What :func:`refine` returns.

    Attributes:
        params: the kept parameters (lowest R-free when the guard keeps the best).
        problem: the static problem that goes with them (removed waters have occupancy 0 in it).
        state: the X-ray state of the kept model (mask, scales, σA, neighbours, w_A).
        history: list of CycleStats, cycle 0 = the input model.
        best_cycle: index into history of the kept model.
        warnings: overfitting-guard and water messages.
        wall_s: total time (s).
        removed_waters: labels of waters removed (their occupancy is 0 in ``problem``; the writers
            leave them out).
        removed_atoms: (n_atoms,) bool mask of the removed atoms.
        setup: the setup the kept parameters belong to (a new one when water picking changed
            the atoms; write the outputs from this one).
        converged_after: the cycle after which the macrocycles stopped on convergence
            (``refine.converge_shift``), or None when every planned cycle ran.
        stopped_after: the cycle after which they stopped because R-free kept rising (``guard.stop_after_rises``,
            :func:`jaxrefine.refine.guard.stop_for_rising_r_free`), or None.
    """

    params: Params
    problem: Problem
    state: XrayState
    history: list
    best_cycle: int
    warnings: list
    wall_s: float
    removed_waters: list
    removed_atoms: np.ndarray
    setup: Any = None
    converged_after: int | None = None
    stopped_after: int | None = None


def prepare_refinement(cfg: Config):
    """An ``on_problem`` for :func:`jaxrefine.problem.setup.build_setup`: once the problem is built, compile the
    L-BFGS program that the starting w_A and the macrocycles call, on a background thread while the setup fits
    the mask, scales and σA (cold 5kzb: 15.1 -> 13.1-13.7 s, the same 47 compilations; see
    benchmarks/README.md).  Only for the L-BFGS loop, which every default refinement runs first (the starting
    w_A's gradient), or, where the macrocycles take Gauss-Newton steps alone (4iid), for the Gauss-Newton program,
    which then also gives that gradient (the L-BFGS loop is never compiled: 4iid cold 31.7 -> 29.8 s, warm 17.9 ->
    15.7 s); nothing happens with the compilation cache off.  The hook returns the preparation's
    Future (or None)."""

    def on_problem(problem, params, state_spec, refl, strategy=None):
        settings = LoopSettings.from_config(cfg, refl.d_min, strategy=strategy)
        if settings.w_a != "auto" and settings.optimizer != "lbfgs":
            return None
        target = settings.rigid_target if settings.strategy == "rigid" else settings.target
        with_b = _gauss_newton_only(settings, params)
        if with_b is not None:  # the macrocycles and the starting w_A's gradient call the Gauss-Newton program alone
            return prepare_gauss_newton(params, problem, state_spec, target, with_b)
        return prepare_block_minimiser(params, problem, state_spec, target)

    return on_problem


def _gauss_newton_only(settings: LoopSettings, params: Params):
    """The Gauss-Newton program's ``with_b`` where every macrocycle minimises by Gauss-Newton steps alone (no
    L-BFGS steps, no w_A scan, no rigid-body or separate B or occupancy blocks: 4iid); None otherwise."""
    blocks = STRATEGY_BLOCKS.get(settings.strategy, ())  # () for "auto" not yet resolved
    if settings.rigid_first or settings.scan_w_a or "xyz" not in blocks:
        return None
    joint, n_gn, n_lbfgs = _coordinate_plan(settings, params, blocks)
    if (not joint and blocks != ("xyz",)) or n_gn <= 0 or n_lbfgs > 0:
        return None
    return joint and _isotropic(params)


def _joint_blocks(blocks, params: Params) -> tuple:
    """The blocks minimised with the coordinates when coordinates and B go together: the occupancies ride along where
    the strategy refines them and the model has occupancy groups."""
    return ("xyz", "b", "occ") if "occ" in blocks and params.occ_raw.shape[0] else ("xyz", "b")


def _coordinate_plan(settings: LoopSettings, params: Params, blocks) -> tuple:
    """(joint, Gauss-Newton steps, L-BFGS steps) of a macrocycle's coordinate minimisation for the strategy's ``blocks``."""
    joint = settings.joint and "b" in blocks
    n_gn, n_lbfgs = _gauss_newton_steps(settings, params, joint, _joint_blocks(blocks, params) if joint else ("xyz",),
                                        settings.steps["xyz"])
    return joint, n_gn, n_lbfgs


def choose_initial_w_a(setup: Setup, problem: Problem | None = None, state: XrayState | None = None,
                       params: Params | None = None, settings: LoopSettings | None = None) -> float:
    """The starting w_A: the configured number, or (auto) the balance of gradient norms
    (:func:`jaxrefine.refine.weights.initial_w_a`) at the setup's (or the given) parameters."""
    settings = settings or LoopSettings.from_config(setup.config, setup.refl.d_min, strategy=setup_strategy(setup))
    if settings.w_a != "auto":
        return float(settings.w_a)
    problem = setup.problem if problem is None else problem
    state = setup.state if state is None else state
    params = setup.params if params is None else params
    # a rigid-body-only run minimises the rigid target throughout: balance against that one (and compile
    # only its loop)
    target = settings.rigid_target if settings.strategy == "rigid" else settings.target
    gx = xray_gradient_norm(params, problem, state, target, _gauss_newton_only(settings, params))
    return wmod.initial_w_a(gx, problem.restraints, setup.model.n_atoms, settings.target_rmsz)


def _free_nll(f_model, problem: Problem, state: XrayState) -> float:
    """Free-set −log-likelihood of ``f_model`` (the parameters' F_model with the state's scales, from the compiled
    F_calc that every report shares) with the state's σA: numpy float64 on the host (no program of its own: it was
    one more to compile beside the minimiser's in a cold run, 0.06-0.08 s)."""
    x = problem.xray
    fo, sig, fm, centric, eps, free, d, s = (np.asarray(a) for a in (x.f_obs, x.sig_f_obs, f_model, x.centric,
                                                                     x.epsilon, x.free, state.sigma_a.d, state.sigma_a.s))
    fo, sig, eps, d, s = (a.astype(np.float64) for a in (fo, sig, eps, d, s))
    sigma_a = state.sigma_a._replace(d=d, s=s)
    return float(ml_amplitude_target(fo, sig, fm.astype(np.complex128), sigma_a, centric, eps, free))


def _prepare_cycle_programs(params: Params, problem: Problem, state: XrayState, settings: LoopSettings) -> None:
    """Compile (or load) the small host program of the first macrocycle — the minimiser's shifts applied to the
    parameters — with the starting arrays, which have the shapes and placements of the later ones.  Called while the
    minimiser's program compiles on its thread: the main thread would wait for it idle and then compile it.  The
    values are not used."""
    shifts = jax.tree_util.tree_map(on_device, zero_shifts(params))  # placed as the minimiser's output is
    apply_shifts_jit(shifts, block_mask(params, ("xyz",)), params, problem)


def _weight_trials(weights, params, problem, state, settings: LoopSettings, n_steps: int) -> list:
    """``n_steps`` coordinate steps from ``params`` with each weight of ``weights`` (same compiled minimiser: w_A
    is traced; the trials side by side, :func:`jaxrefine.refine.blocks.minimise_blocks_each`) and each trial's
    score: a list of ((params, state), :class:`jaxrefine.refine.weights.WeightTrial`)."""
    trial_states = [state._replace(w_a=on_device(w, state.w_a.dtype)) for w in weights]
    moved = minimise_blocks_each(("xyz",), params, problem, trial_states, n_steps, settings.target,
                                 settings.optimizer, settings.learning_rate, settings.converge_rtol)
    out = []
    for w, p, trial_state in zip(weights, moved, trial_states):
        fm = f_model_on_host(p, problem, trial_state)  # one F_calc for the trial's R-free and likelihood
        st = cycle_statistics(0, p, problem, trial_state, time.perf_counter(), f_model=fm)
        nll = float(_free_nll(fm, problem, trial_state))
        out.append(((p, trial_state), wmod.WeightTrial(w, nll, st.r_free, st.rms_bond, st.rms_angle)))
    return out


def describe_minimiser(settings: LoopSettings, setting: str, d_min: float) -> str:
    """One log line: how a macrocycle minimises coordinates and B, and why."""
    why = f"refine.joint_xyz_b {setting}" + (
        f": d_min {d_min:.2f} Å {'<' if d_min < JOINT_D_MAX else '>='} {JOINT_D_MAX} Å" if setting == "auto" else "")
    if settings.joint:
        what = "coordinates, B and occupancies" if "occ" in STRATEGY_BLOCKS[settings.strategy] else "coordinates and B"
        return (f"minimiser: {what} together, {settings.steps['xyz']} steps per macrocycle, B shifts "
                f"scaled x{settings.b_scale:g} ({why})")
    return f"minimiser: {settings.steps['xyz']} coordinate steps, then {settings.steps['b']} B steps per macrocycle ({why})"


def _isotropic(params: Params) -> bool:
    return params.u_raw is None and params.tls_raw is None


def _gauss_newton_steps(settings: LoopSettings, params: Params, joint: bool, free_blocks, steps_xyz: int) -> tuple:
    """(Gauss-Newton steps, L-BFGS steps) of this coordinate minimisation (:func:`blocks.gauss_newton_plan`)."""
    return gauss_newton_plan(settings.gn_steps, steps_xyz, joint, _isotropic(params), "occ" in free_blocks,
                             params.xyz_frac.shape[0], settings.d_min, settings.target, settings.optimizer)


def describe_gauss_newton(settings: LoopSettings, params: Params) -> str:
    """One log line on the Gauss-Newton steps of each macrocycle ('' when there are none)."""
    joint, n_gn, n_lbfgs = _coordinate_plan(settings, params, STRATEGY_BLOCKS[settings.strategy])
    if not n_gn:
        return ""
    what = "coordinates and isotropic B" if joint and _isotropic(params) else "coordinates"
    why = (f"auto: isotropic B, {params.xyz_frac.shape[0]} atoms >= {GN_AUTO_MIN_ATOMS}, d_min {settings.d_min:.2f} Å"
           if settings.gn_steps == "auto" else "refine.gn_steps")
    return f"gauss-newton: {n_gn} steps of the {what} per macrocycle, then {n_lbfgs} L-BFGS steps ({why})"


MOVING_BLOCKS = ("xyz", "rigid")  # the blocks that move atoms (the others: ADPs, occupancies)


def _minimise_cycle(blocks, params, problem, state, setup, settings: LoopSettings, scan: bool = False, calibration=None,
                    coordinates_final=None):
    """One macrocycle's minimisation: each block of ``blocks`` in turn, or coordinates and B together
    (``settings.joint``: one minimisation of the coordinate block's steps, B shifts scaled by
    ``settings.b_scale``; the occupancies too when the cycle refines them).  With ``scan`` the coordinate block
    is a w_A scan
    (:func:`jaxrefine.refine.weights.scan_w_a`; its trials move coordinates only, the rest of the cycle's
    steps are joint) and the state returned carries the chosen w_A.  Returns (params, state, settled, calibration):
    ``settled`` is True when a scan kept the current w_A; ``calibration`` that of the Gauss-Newton steps (measured
    in the first cycle that takes them, then handed back in).  ``coordinates_final(params)`` is called once, before
    the first block after which no block moves atoms (a B block after the coordinates), e.g. to build the solvent
    mask meanwhile."""
    settled = False
    joint = settings.joint and "xyz" in blocks and "b" in blocks
    # occupancies in the joint minimisation (4xof, altloc occupancies reset to 0.5: R-free 0.1783 with 133 F
    # evaluations, as a separate 10-step block after it with 152; fixed at 0.5: 0.1809): no steps of their own
    joint_blocks = _joint_blocks(blocks, params) if joint else ("xyz", "b")
    for i, block in enumerate(blocks):
        if block == "occ" and params.occ_raw.shape[0] == 0:
            continue
        if joint and block in joint_blocks[1:]:  # refined with the coordinates
            continue
        if coordinates_final is not None and not any(b in MOVING_BLOCKS for b in blocks[i:]):
            coordinates_final(params)
            coordinates_final = None
        if block == "xyz" and (scan or joint):
            n_steps = settings.steps["xyz"]
            if scan:
                start, w_now = params, float(state.w_a)
                n_trial, n_steps = wmod.trial_steps(n_steps)
                (params, state), kept, line = wmod.scan_w_a(
                    w_now, lambda ws: _weight_trials(ws, start, problem, state, settings, n_trial))
                settled = wmod.scan_settled(w_now, kept)
                log.info(line + ("; w_A settled: later cycles keep it without a scan" if settled else ""))
            n_gn, n_steps = _gauss_newton_steps(settings, params, joint, joint_blocks, n_steps)
            params, calibration = gauss_newton_block(params, problem, state, n_gn, settings.target, settings.converge_rtol,
                                                     with_b=joint and _isotropic(params), calibration=calibration)
            params = minimise_blocks(joint_blocks if joint else ("xyz",), params, problem, state, n_steps, settings.target,
                                     settings.optimizer, settings.learning_rate, settings.converge_rtol, settings.b_scale)
            continue
        block_problem, target = problem, settings.target
        if block == "rigid":
            block_problem = low_resolution_work_set(problem, setup.refl.d, setup.refl.d_min, settings.rigid_d_min)
            target = settings.rigid_target
        n_steps = settings.steps[block]
        if block == "xyz":
            n_gn, n_steps = _gauss_newton_steps(settings, params, False, (block,), n_steps)
            params, calibration = gauss_newton_block(params, problem, state, n_gn, settings.target, settings.converge_rtol,
                                                     calibration=calibration)
        params = minimise_blocks((block,), params, block_problem, state, n_steps, target,
                                 settings.optimizer, settings.learning_rate, settings.converge_rtol)
    return params, state, settled, calibration


def _actions_timed(hooks):
    """The timing section of the caller's after-minimise actions (``host_s.actions``; nothing recorded without any)."""
    return timing.section("actions") if hooks else contextlib.nullcontext()


def setup_strategy(setup: Setup) -> str:
    """The strategy the setup's configuration asks for, ``auto`` as build_setup resolved it for the setup's model and
    data (also when a caller hands refine() the setup with another configuration: ``setup._replace(config=...)``)."""
    if setup.config.refine.strategy != "auto":
        return setup.config.refine.strategy
    return setup.strategy[0] or choose_strategy("auto", setup.refl.d_min, setup.model)[0]


def refine(setup: Setup, n_cycles: int | None = None, strategy: str | None = None, callback=None,
           after_minimise=(), between_cycles=()) -> RefinementResult:
    """Run macrocycles on ``setup`` (see module docstring).

    Args:
        setup: from :func:`jaxrefine.problem.build_setup`.
        n_cycles: macrocycles (default from the config).
        strategy: rigid | xyz | b | xyz_b | xyz_b_occ (default: the setup's, which resolved ``auto``).
        callback: called with each :class:`CycleStats` (progress display).
        after_minimise, between_cycles: actions ``hook(CycleContext) -> CycleContext`` run in each
            macrocycle (see :class:`CycleContext`), e.g. the water actions of
            :func:`jaxrefine.validate.waters.water_hooks`.  None by default.
    """
    settings = LoopSettings.from_config(setup.config, setup.refl.d_min, n_cycles, strategy or setup_strategy(setup))
    if uses_rigid_bodies(settings.strategy, settings.rigid_first):  # a setup built for a strategy without them
        setup = with_rigid_bodies(setup)
    # the persistent compilation cache, as for the CLI (runtime.compilation_cache): notebooks and scripts that
    # call refine() directly load the loop's compiled code from an earlier process instead of compiling it
    enable_compilation_cache(setup.config.runtime.compilation_cache, setup.config.runtime.cache_max_mb)
    t0 = time.perf_counter()
    problem, params, state = setup.problem, setup.params, setup.state
    timing.begin_cycle(0)  # the starting model: initial w_A and statistics
    # the statistics first (they do not depend on w_A): in a cold run their programs then compile while the
    # minimiser's program, which the initial w_A needs, is still compiling on its thread (the geometry report's
    # values are numpy: no program)
    start = cycle_statistics(0, params, problem, state, t0)
    _prepare_cycle_programs(params, problem, state, settings)
    with timing.section("initial_w_a"):
        w_a = choose_initial_w_a(setup, problem, state, params, settings)
    state = state._replace(w_a=jnp.asarray(w_a, problem.maps.orth.dtype))
    history = [start._replace(w_a=float(state.w_a), time_s=time.perf_counter() - t0)]
    log_cycle(history[-1], callback)
    previous = current_model_arrays(params, problem)[:2]  # (xyz, B) of the last cycle's model: its shifts
    # the input model competes only when asked; else the first refined cycle replaces it whatever its R-free
    start_r_free = history[0].r_free if (settings.keep_input and settings.keep_best) else np.inf
    kept = Kept(start_r_free, 0, params, problem, state, setup)
    warnings, removed_labels = [], []
    plan = cycle_plan(settings.strategy, settings.n_cycles, settings.rigid_first, settings.n_rigid_cycles)
    if any("xyz" in blocks and "b" in blocks for blocks in plan):
        log.info(describe_minimiser(settings, setup.config.refine.joint_xyz_b, setup.refl.d_min))
    if any("xyz" in blocks for blocks in plan):
        line = describe_gauss_newton(settings, params)
        if line:
            log.info(line)
    scanning = settings.scan_w_a  # until a scan keeps the current weight (weights.scan_settled)
    gn_calibration = None  # of the Gauss-Newton steps: measured in their first cycle
    converged_after = stopped_after = None
    compare_from = 0  # R-free rises are counted after this cycle (the last change of atoms)
    nb_built_at = np.asarray(setup.model.xyz_cart, float)  # where the setup's non-bonded list was built
    mask_at = riding_at = nb_built_at  # and its mask and riding hydrogens
    for cycle, blocks in enumerate(plan, start=1):
        last = cycle == len(plan)
        timing.begin_cycle(cycle)
        if cycle > 1:  # the mask, scales and σA were refreshed at the end of the previous cycle
            with timing.section("neighbours"):
                state, nb_built_at = refresh_neighbours(setup, problem, state, params, nb_built_at)
        ahead = []  # the mask started once the cycle's coordinates are final (start_f_mask)

        def mask_ahead(p):  # called inside this cycle's _minimise_cycle: the loop's current names
            xyz_final = current_model_arrays(p, problem)[0]
            if cycle % settings.mask_every == 0 and mask_moved(xyz_final, mask_at) and mask_ahead_pays(setup):
                ahead.append(start_f_mask(setup, problem, state, xyz_final))

        with timing.section("optimise"):
            params, state, settled, gn_calibration = _minimise_cycle(blocks, params, problem, state, setup, settings,
                                                                     scanning, gn_calibration, mask_ahead)
        scanning = scanning and not settled
        xyz = current_model_arrays(params, problem)[0]
        if ("xyz" in blocks or "rigid" in blocks) and moved_beyond(xyz, riding_at, REBUILD_SHIFT):  # riding H re-placed
            with timing.section("riding_h"):
                problem = riding_problem(problem, setup.model, xyz, setup.monlib, setup.config.model.ligands)
            riding_at = xyz
        with _actions_timed(after_minimise):  # the caller's, e.g. the water check (5orl: ~0.3 s a cycle)
            for hook in after_minimise:
                ctx = hook(CycleContext(cycle, last, blocks, setup, params, problem, state))
                params, problem, state = ctx.params, ctx.problem, ctx.state
                removed_labels += list(ctx.removed)
        xyz, b_now, _ = current_model_arrays(params, problem)  # after the actions (they may move atoms)
        rebuild_mask = cycle % settings.mask_every == 0 and mask_moved(xyz, mask_at)
        with timing.section("xray_state"):  # mask, scales, σA
            state, f_model = refit_xray_state(setup, problem, state, params, rebuild_mask=rebuild_mask,
                                              pending=ahead[0] if ahead else None)
        mask_at = xyz if rebuild_mask else mask_at
        st = cycle_statistics(cycle, params, problem, state, t0, f_model=f_model, since=previous, arrays=(xyz, b_now))
        previous = (xyz, b_now)
        history.append(st)
        log_cycle(st, callback)
        warnings += overfitting_warnings(history, settings.max_gap)
        kept = keep_better(kept, Kept(st.r_free, cycle, params, problem, state, setup,
                                      in_limits=within_limits(st.rms_bond, st.rms_angle)), settings.keep_best)
        atoms_changed = False
        for hook in between_cycles:
            with timing.section("actions"):
                ctx = hook(CycleContext(cycle, last, blocks, setup, params, problem, state))
            if ctx.setup is not setup:  # atoms changed: older models are not comparable
                atoms_changed = True
                kept = Kept(st.r_free, cycle, ctx.params, ctx.problem, ctx.state, ctx.setup,
                            in_limits=within_limits(st.rms_bond, st.rms_angle))
                nb_built_at = mask_at = riding_at = None  # other atoms: all rebuilt next cycle
            setup, params, problem, state = ctx.setup, ctx.params, ctx.problem, ctx.state
            removed_labels += list(ctx.removed)
        if atoms_changed:  # the next cycle's shifts from the new atoms (waters in slots moved from anywhere)
            previous = current_model_arrays(params, problem)[:2]
        if settings.w_a == "auto" and "xyz" in blocks and not settings.scan_w_a:
            w_a = wmod.adjust_w_a(float(state.w_a), st.rmsz_bond, settings.target_rmsz, st.rms_bond, st.rms_angle)
            state = state._replace(w_a=jnp.asarray(w_a, problem.maps.orth.dtype))
        n_xyz = sum("xyz" in b for b in plan[:cycle])
        compare_from = cycle + 1 if atoms_changed else compare_from
        if (not last and "xyz" in blocks and not scanning and not atoms_changed
                and stop_for_rising_r_free(history, kept.cycle, float(state.w_a), settings.stop_after_rises,
                                           compare_from)):
            rises = " -> ".join(f"{h.r_free:.4f}" for h in history[-settings.stop_after_rises - 1:])
            log.info("R-free rose in %d cycles in a row (%s) with w_A settled: the remaining %d macrocycles are not "
                     "run, the guard keeps cycle %d (guard.stop_after_rises %d)", settings.stop_after_rises, rises,
                     len(plan) - cycle, kept.cycle, settings.stop_after_rises)
            stopped_after = cycle
            break
        if (not last and "xyz" in blocks and not scanning and not atoms_changed
                and converged(st, n_xyz, float(state.w_a), settings.converge_shift)):
            log.info("converged after cycle %d (RMS shifts %.4f Å, %.3f Å² below refine.converge_shift %g Å; w_A "
                     "settled): the remaining %d macrocycles are not run", cycle, st.shift_xyz, st.shift_b,
                     settings.converge_shift, len(plan) - cycle)
            converged_after = cycle
            break
    if kept.cycle == 0 and len(history) > 1:
        best = min(h.r_free for h in history[1:])
        start = history[0]
        geometry = ("" if within_limits(start.rms_bond, start.rms_angle) else
                    f", whose geometry is beyond the limits (RMS bond {start.rms_bond:.4f} Å, angle {start.rms_angle:.2f}°); "
                    "guard.keep_input=false returns the best refined cycle instead")
        msg = (f"no refined cycle lowered R-free below the input model's ({start.r_free:.4f}; best refined "
               f"{best:.4f}): keeping the input model{geometry}")
        log.warning(msg)
        warnings.append(msg)
    elif kept.cycle != len(history) - 1:
        k, last_st = history[kept.cycle], history[-1]
        why = ("" if within_limits(last_st.rms_bond, last_st.rms_angle) or not kept.in_limits else
               f": the last is beyond the geometry limits (RMS bond {last_st.rms_bond:.4f} Å, angle {last_st.rms_angle:.2f}°)")
        msg = (f"keeping the model of cycle {kept.cycle} (R-free {k.r_free:.4f}) rather than the last "
               f"(R-free {last_st.r_free:.4f}){why}")
        log.info(msg)
        warnings.append(msg)
    removed_atoms = (np.asarray(kept.problem.maps.occ0) <= 0) & (kept.setup.model.occ > 0)
    if kept.setup.spare_waters is not None:  # slots for water picking that no water filled
        removed_atoms |= kept.setup.spare_waters & (kept.setup.model.occ <= 0)
    return RefinementResult(params=kept.params, problem=kept.problem, state=kept.state, history=history,
                            best_cycle=kept.cycle, warnings=warnings, wall_s=time.perf_counter() - t0,
                            removed_waters=removed_labels, removed_atoms=removed_atoms, setup=kept.setup,
                            converged_after=converged_after, stopped_after=stopped_after)


def refined_model(result: RefinementResult):
    """The kept model of a refinement as a :class:`jaxrefine.io.model.Model` (removed waters left out)."""
    model = model_of(result.setup.model, result.params, result.problem, result.setup.adp_choice)
    keep = ~np.asarray(result.removed_atoms, bool)
    return model if keep.all() else model.subset(keep)


def refine_briefly(model, refl, n_cycles: int, cfg: Config | None = None, **hooks):
    """``model`` refined for ``n_cycles`` macrocycles (xyz and B by default), as a Model of the same
    atoms (waters removed by a hook keep their row with occupancy 0).  ``hooks``: as for :func:`refine`."""
    setup = build_setup(None, None, cfg, model=model, refl=refl)
    result = refine(setup, n_cycles=n_cycles, **hooks)
    return model_of(model, result.params, result.problem, result.setup.adp_choice)
