"""Macrocycles: update mask, scales, σA, neighbours and w_A (outside jit), then minimise (inside jit).

    setup = build_setup(model_path, data_path, config)
    result = refine(setup)                      # RefinementResult(params, history, best_cycle, ...)
    write_outputs(result, setup, "out/")

One line per macrocycle is logged at INFO: R-work, R-free, RMS bond/angle, w_A and time.
"""
from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config
from ..problem.neighbours import build_nonbonded
from ..problem.params import Params
from ..problem.problem import Problem, Setup
from ..problem.setup import build_setup, cast_floats, current_model_arrays, f_model_of, model_of, update_xray_state
from ..restraints import geometry_report
from ..xray.stats import r_factors
from . import weights as wmod
from .energy import SHIFT_ENERGY, apply_shifts, block_mask, xray_energy, zero_shifts
from .optimize import minimise

log = logging.getLogger("jaxrefine")

STRATEGY_BLOCKS = {
    "rigid": ("rigid",),
    "xyz": ("xyz",),
    "b": ("b",),
    "xyz_b": ("xyz", "b"),
    "xyz_b_occ": ("xyz", "b", "occ"),
}


class CycleStats(NamedTuple):
    cycle: int
    r_work: float
    r_free: float
    rms_bond: float
    rms_angle: float
    rmsz_bond: float
    w_a: float
    k_sol: float
    b_sol: float
    time_s: float

    def as_dict(self):
        return {k: (float(v) if k != "cycle" else int(v)) for k, v in self._asdict().items()}


class CycleContext(NamedTuple):
    """What a between-cycle action sees and returns (``hook(ctx) -> ctx._replace(...)``).

    Actions are handed to :func:`refine` by the caller (``refine`` imports no analysis code):
    ``after_minimise`` actions run after the minimisation of a macrocycle, before the X-ray state
    is refitted, and must keep every array shape (e.g. zero the occupancy of a bad water);
    ``between_cycles`` actions run after the cycle's statistics and may return a new ``setup``
    (atoms added or removed), which restarts the comparison of models by R-free.

    Attributes:
        cycle: the macrocycle just run (1-based); last: whether it is the final one.
        blocks: the parameter blocks it refined ("xyz", "b", "occ", "rigid").
        setup, params, problem: the current refinement.
        removed: labels of atoms the action removed (occupancy 0; the writers leave them out).
    """

    cycle: int
    last: bool
    blocks: tuple
    setup: Setup
    params: Params
    problem: Problem
    removed: tuple = ()


class RefinementResult(NamedTuple):
    """What :func:`refine` returns.

    Attributes:
        params: the kept parameters (lowest R-free when the guard keeps the best).
        problem: the problem state that goes with them (scales, mask, σA).
        history: list of CycleStats, cycle 0 = the input model.
        best_cycle: index into history of the kept model.
        warnings: overfitting-guard and water messages.
        wall_s: total time (s).
        removed_waters: labels of waters removed (their occupancy is 0 in ``problem``; the writers
            leave them out).
        removed_atoms: (n_atoms,) bool mask of the removed atoms.
        setup: the setup the kept parameters belong to (a new one when water picking changed
            the atoms; write the outputs from this one).
    """

    params: Params
    problem: Problem
    history: list
    best_cycle: int
    warnings: list
    wall_s: float
    removed_waters: list
    removed_atoms: np.ndarray
    setup: Any = None


def cycle_statistics(cycle: int, params: Params, problem: Problem, setup: Setup, t0: float) -> CycleStats:
    fm = np.asarray(f_model_of(params, problem))
    x = problem.xray
    r = r_factors(np.asarray(x.f_obs), fm, np.asarray(x.free))
    xyz, _, _ = current_model_arrays(params, problem)
    geo = geometry_report(xyz, problem.restraints, None)
    sc = x.scales
    return CycleStats(
        cycle=cycle, r_work=float(r["r_work"]), r_free=float(r["r_free"]), rms_bond=float(geo.rms_bond),
        rms_angle=float(geo.rms_angle), rmsz_bond=float(geo.rms_z_bond), w_a=float(problem.w_a),
        k_sol=float(sc.k_sol), b_sol=float(sc.b_sol), time_s=time.perf_counter() - t0,
    )


def _grad_norm_xray_xyz(params, problem, target):
    """‖∂E_xray/∂x‖ over Cartesian shifts (Å) at the current parameters."""
    mask = block_mask(params, ("xyz",))

    def e_x(shifts):
        return xray_energy(apply_shifts(shifts, mask, params, problem), problem, target)

    g = jax.jit(jax.grad(e_x))(zero_shifts(params))
    return float(jnp.linalg.norm(g.xyz_frac))


def choose_initial_w_a(setup: Setup, problem: Problem, params: Params) -> float:
    cfg = setup.config
    if cfg.weights.w_a != "auto":
        return float(cfg.weights.w_a)
    gx = _grad_norm_xray_xyz(params, problem, cfg.refine.target)
    return wmod.initial_w_a(gx, problem.restraints, setup.model.n_atoms, _target_rmsz(setup))


def _target_rmsz(setup: Setup) -> float:
    return wmod.target_rmsz_for(setup.refl.d_min, setup.config.weights.target_rmsz_bond)


def rigid_body_problem(problem: Problem, setup: Setup) -> Problem:
    """The problem with the work set limited to d >= refine.rigid_d_min (low-resolution data give
    rigid-body refinement a wide radius of convergence; same shapes, so no recompile)."""
    d_cut = setup.config.refine.rigid_d_min
    if not d_cut or d_cut <= setup.refl.d_min:
        return problem
    low = jnp.asarray(setup.refl.d >= d_cut)
    return problem._replace(xray=problem.xray._replace(work=problem.xray.work & low))


def minimise_blocks(blocks, params: Params, problem: Problem, cfg: Config, n_steps: int) -> Params:
    """Minimise E_total over the given parameter blocks (one jit-compiled optax loop for all blocks)."""
    if n_steps <= 0:
        return params
    fn = SHIFT_ENERGY[cfg.refine.target]
    mask = block_mask(params, blocks)
    lr = jnp.asarray(cfg.refine.learning_rate, problem.maps.orth.dtype)
    shifts, _ = minimise(fn, zero_shifts(params), (mask, params, problem), n_steps=n_steps,
                         method=cfg.refine.optimizer, learning_rate=lr)
    return apply_shifts(shifts, mask, params, problem)


def refine(setup: Setup, n_cycles: int | None = None, strategy: str | None = None, callback=None,
           after_minimise=(), between_cycles=()) -> RefinementResult:
    """Run macrocycles on ``setup`` (see module docstring).

    Args:
        setup: from :func:`build_setup`.
        n_cycles: macrocycles (default from the config).
        strategy: rigid | xyz | b | xyz_b | xyz_b_occ (default from the config).
        callback: called with each CycleStats (progress display).
        after_minimise, between_cycles: actions ``hook(CycleContext) -> CycleContext`` run in each
            macrocycle (see :class:`CycleContext`), e.g. the water actions of
            :func:`jaxrefine.validate.waters.water_hooks`.  None by default.
    """
    cfg = setup.config
    n_cycles = cfg.refine.n_cycles if n_cycles is None else n_cycles
    strategy = strategy or cfg.refine.strategy
    t0 = time.perf_counter()
    problem, params = setup.problem, setup.params
    w_a = choose_initial_w_a(setup, problem, params)
    problem = problem._replace(w_a=jnp.asarray(w_a, problem.maps.orth.dtype))
    history = [cycle_statistics(0, params, problem, setup, t0)]
    _log_cycle(history[-1], callback)
    # the guard keeps the refined cycle with the lowest R-free (the input model itself, cycle 0, is
    # returned only when no macrocycle runs)
    best = (np.inf, 0, params, problem)
    warnings = []
    removed_labels = []
    best_setup = setup
    steps = {"xyz": cfg.refine.steps_xyz, "b": cfg.refine.steps_b, "occ": cfg.refine.steps_occ, "rigid": cfg.refine.steps_rigid}
    plan = []
    if cfg.refine.rigid_first and strategy != "rigid":
        plan += [("rigid",)] * cfg.refine.n_rigid_cycles
    plan += [STRATEGY_BLOCKS[strategy]] * n_cycles
    for cycle, blocks in enumerate(plan, start=1):
        if cycle > 1:  # the mask, scales and σA were refreshed at the end of the previous cycle
            xyz, _, _ = current_model_arrays(params, problem)
            nb = build_nonbonded(xyz, problem.restraints, setup.model.crystal, max_pairs=int(problem.nonbonded.i.shape[0]))
            problem = problem._replace(nonbonded=cast_floats(nb, problem.maps.orth.dtype))
        for block in blocks:
            if block == "occ" and params.occ_raw.shape[0] == 0:
                continue
            block_problem = rigid_body_problem(problem, setup) if block == "rigid" else problem
            params = minimise_blocks((block,), params, block_problem, cfg, steps[block])
        for hook in after_minimise:
            ctx = hook(CycleContext(cycle, cycle == len(plan), blocks, setup, params, problem))
            params, problem = ctx.params, ctx.problem
            removed_labels += list(ctx.removed)
        rebuild = cycle % max(cfg.solvent.update_every, 1) == 0
        problem = update_xray_state(setup, problem, params, rebuild_mask=rebuild)  # statistics with a fresh mask
        st = cycle_statistics(cycle, params, problem, setup, t0)
        history.append(st)
        _log_cycle(st, callback)
        warnings += _guard(history, cfg)
        if st.r_free < best[0] - 1e-6 or not cfg.guard.keep_best:
            best = (st.r_free, cycle, params, problem)
            best_setup = setup
        for hook in between_cycles:
            ctx = hook(CycleContext(cycle, cycle == len(plan), blocks, setup, params, problem))
            if ctx.setup is not setup:  # atoms changed: older models are not comparable
                best = (history[-1].r_free, cycle, ctx.params, ctx.problem)
                best_setup = ctx.setup
            setup, params, problem = ctx.setup, ctx.params, ctx.problem
            removed_labels += list(ctx.removed)
        if cfg.weights.w_a == "auto" and "xyz" in blocks:
            problem = problem._replace(w_a=jnp.asarray(wmod.adjust_w_a(float(problem.w_a), st.rmsz_bond, _target_rmsz(setup)), problem.maps.orth.dtype))
    _, best_cycle, params, problem = best
    if best_cycle != len(history) - 1:
        msg = (f"keeping the model of cycle {best_cycle} (R-free {history[best_cycle].r_free:.4f}) rather than the last "
               f"(R-free {history[-1].r_free:.4f})")
        log.info(msg)
        warnings.append(msg)
    return RefinementResult(params=params, problem=problem, history=history, best_cycle=best_cycle, warnings=warnings,
                            wall_s=time.perf_counter() - t0, removed_waters=removed_labels,
                            removed_atoms=(np.asarray(problem.maps.occ0) <= 0) & (best_setup.model.occ > 0), setup=best_setup)


def _guard(history, cfg) -> list:
    """Overfitting guard messages for the latest cycle."""
    out = []
    cur, prev = history[-1], history[-2]
    if cur.r_free > prev.r_free + 1e-4 and cur.r_work < prev.r_work - 1e-4:
        out.append(
            f"cycle {cur.cycle}: R-free rose ({prev.r_free:.4f} -> {cur.r_free:.4f}) while R-work fell "
            f"({prev.r_work:.4f} -> {cur.r_work:.4f}): the model is fitting noise; raise w_A (weights.w_a) or refine fewer parameters"
        )
    gap = cur.r_free - cur.r_work
    if gap > cfg.guard.max_gap:
        out.append(
            f"cycle {cur.cycle}: R-free - R-work = {gap:.3f} exceeds {cfg.guard.max_gap:.3f}; likely overfitting: "
            f"raise w_A or restrain B more (weights.w_b)"
        )
    for m in out:
        log.warning(m)
    return out


HEADER = "cycle  R-work  R-free  rms_bond  rms_angle  rmsZ_bond     w_A   k_sol   B_sol   time_s"


def format_cycle(st: CycleStats) -> str:
    return (f"{st.cycle:5d}  {st.r_work:.4f}  {st.r_free:.4f}  {st.rms_bond:8.4f}  {st.rms_angle:9.3f}  {st.rmsz_bond:9.3f}"
            f"  {st.w_a:6.3g}  {st.k_sol:6.3f}  {st.b_sol:6.1f}  {st.time_s:7.1f}")


def _log_cycle(st: CycleStats, callback):
    if st.cycle == 0:
        log.info(HEADER)
    log.info(format_cycle(st))
    if callback is not None:
        callback(st)


def refined_model(result: RefinementResult):
    """The kept model of a refinement as a :class:`jaxrefine.io.model.Model` (removed waters left out)."""
    model = model_of(result.setup.model, result.params, result.problem)
    keep = ~np.asarray(result.removed_atoms, bool)
    return model if keep.all() else model.subset(keep)


def refine_briefly(model, refl, n_cycles: int, cfg: Config | None = None, **hooks):
    """``model`` refined for ``n_cycles`` macrocycles (xyz and B by default), as a Model of the same
    atoms (waters removed by a hook keep their row with occupancy 0).  ``hooks``: as for :func:`refine`."""
    setup = build_setup(None, None, cfg, model=model, refl=refl)
    result = refine(setup, n_cycles=n_cycles, **hooks)
    return model_of(model, result.params, result.problem)
