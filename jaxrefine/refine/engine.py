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
from ..io.formfactor_io import it92_form_factors
from ..io.topology import build_nonbonded, build_restraints, find_monlib
from ..params import AtomMaps, Params, atom_b, atom_occ, atom_xyz, occupancy_groups
from ..problem import Problem, Setup, XrayData, initial_params, load_inputs, rigid_bodies
from ..restraints import GeometryWeights, geometry_report
from ..xray.fmodel import choose_sigma_a_set, f_model, fit_scales, model_f_mask, reciprocal_vectors
from ..xray.stats import r_factors
from ..xray.structure_factors import make_sf_setup, structure_factors
from ..xray.targets import estimate_sigma_a, sigma_a_bins
from . import weights as wmod
from .energy import SHIFT_ENERGY, apply_shifts, block_mask, xray_energy, zero_shifts
from .optimize import minimise

log = logging.getLogger("jaxrefine")

SF_B_MARGIN = 15.0  # Å²: the FFT spreading boxes hold Gaussians up to the starting B + this (room for B refinement)

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


# ----------------------------------------------------------------------------- setup
def _dtype(cfg: Config):
    """Working precision: the config's, float32 when x64 is not enabled in JAX."""
    if cfg.refine.precision == "float64" and jax.config.jax_enable_x64:
        return jnp.float64
    if cfg.refine.precision == "float64":
        log.warning("refine.precision=float64 needs jax.config.update('jax_enable_x64', True); using float32")
    return jnp.float32


def cast_floats(tree, dtype):
    """The pytree with every floating-point array leaf cast to ``dtype`` (ints and bools kept)."""
    cdtype = jnp.complex128 if dtype == jnp.float64 else jnp.complex64

    def cast(a):
        if isinstance(a, (np.ndarray, jax.Array)):
            if jnp.issubdtype(a.dtype, jnp.floating):
                return jnp.asarray(a, dtype)
            if jnp.issubdtype(a.dtype, jnp.complexfloating):
                return jnp.asarray(a, cdtype)
        return a

    return jax.tree_util.tree_map(cast, tree)


def geometry_weights(cfg: Config, dtype) -> GeometryWeights:
    w = cfg.weights
    return GeometryWeights(**{f: jnp.asarray(getattr(w, f, 1.0), dtype) for f in GeometryWeights._fields})


def refine_hkl_free(refl):
    """The σA reflection set: the free set when large enough, else the work set (as servalcat)."""
    use, _ = choose_sigma_a_set(refl.free)
    return use


def build_setup(model_path, data_path, cfg: Config | None = None, model=None, refl=None) -> Setup:
    """Read the inputs and build the problem and starting parameters.

    Args:
        model_path, data_path: files (ignored when ``model``/``refl`` are given).
        cfg: configuration (defaults when None).
        model, refl: already-read inputs (for notebooks and tests).
    """
    cfg = cfg or Config()
    if model is None or refl is None:
        model, refl = load_inputs(model_path, data_path, cfg)
    dtype = _dtype(cfg)
    monlib = find_monlib(cfg.model.monlib)
    restraints = cast_floats(build_restraints(model, monlib=monlib, ligands=cfg.model.ligands), dtype)
    nonbonded = cast_floats(build_nonbonded(model, restraints, model.crystal), dtype)
    idx, centres = rigid_bodies(model, cfg.refine.rigid_bodies)
    radii = np.array([np.sqrt(((model.xyz_cart[idx == b] - c) ** 2).sum(1).mean()) + 1.0 for b, c in enumerate(centres)])
    refine_occ = cfg.refine.strategy == "xyz_b_occ"
    occ_group, group_set, set_total, set_size, group_start = occupancy_groups(model, refine_partial=refine_occ)
    if not refine_occ:
        occ_group = -np.ones(model.n_atoms, np.int32)
        group_set = group_start = np.zeros(0)
        set_total = set_size = np.zeros(0)
    maps = AtomMaps(
        orth=jnp.asarray(model.crystal.orth, dtype),
        frac=jnp.asarray(model.crystal.frac, dtype),
        body_index=jnp.asarray(idx),
        body_centre=jnp.asarray(centres, dtype),
        body_radius=jnp.asarray(radii, dtype),
        occ0=jnp.asarray(model.occ, dtype),
        occ_group=jnp.asarray(occ_group, jnp.int32),
        group_set=jnp.asarray(group_set, jnp.int32),
        set_total=jnp.asarray(set_total, dtype),
        set_size=jnp.asarray(set_size, jnp.int32),
        b_min=jnp.asarray(cfg.refine.b_min, dtype),
    )
    params = initial_params(model, maps, np.asarray(group_start, float), np.asarray(group_set, np.int32),
                            np.asarray(set_total, float), np.asarray(set_size, np.int32), dtype)
    ff = it92_form_factors(model.element, model.source)
    u_shape = anisotropic_shape(model, cfg.refine.keep_anisou)
    sf = make_sf_setup(model.crystal, refl.hkl, ff, d_min=refl.d_min, b_iso=model.b_iso, b_margin=SF_B_MARGIN, dtype=dtype,
                       u_aniso=u_shape)
    use = refine_hkl_free(refl)
    bins = sigma_a_bins(refl.d, use)
    xray = XrayData(
        hkl=jnp.asarray(refl.hkl), s2=jnp.asarray(refl.s2, dtype), s_cart=jnp.asarray(reciprocal_vectors(refl.hkl, refl.crystal), dtype),
        sigma_a_use=jnp.asarray(use), f_obs=jnp.asarray(refl.f_obs, dtype),
        sig_f_obs=jnp.asarray(refl.sig_f_obs, dtype), work=jnp.asarray(~refl.free), free=jnp.asarray(refl.free),
        centric=jnp.asarray(refl.centric), epsilon=jnp.asarray(refl.epsilon, dtype), bins=jnp.asarray(bins),
        f_mask=jnp.zeros(refl.n, jnp.complex128 if dtype == jnp.float64 else jnp.complex64), scales=None, sigma_a=None,
    )
    problem = Problem(
        maps=maps, sf=sf, xray=xray, restraints=restraints, nonbonded=nonbonded,
        geo_weights=geometry_weights(cfg, dtype), w_a=jnp.asarray(1.0, dtype), w_b=jnp.asarray(cfg.weights.w_b, dtype),
        u_shape=None if u_shape is None else jnp.asarray(u_shape, dtype),
    )
    setup = Setup(problem=problem, params=params, model=model, refl=refl, config=cfg, monlib=monlib)
    problem = update_xray_state(setup, problem, params)
    return setup._replace(problem=problem)


# ------------------------------------------------------------------ per-macrocycle updates
def current_model_arrays(params: Params, problem: Problem):
    """numpy (xyz_cart, b_iso, occ) for the parameters."""
    xyz_cart, _ = atom_xyz(params, problem.maps)
    return np.asarray(xyz_cart, float), np.asarray(atom_b(params, problem.maps), float), np.asarray(atom_occ(params, problem.maps), float)


def f_calc_of(params: Params, problem: Problem):
    _, xyz_frac = atom_xyz(params, problem.maps)
    return structure_factors(xyz_frac, atom_b(params, problem.maps), atom_occ(params, problem.maps), problem.sf,
                             problem.u_shape)


def anisotropic_shape(model, keep: bool):
    """(n, 6) trace-free anisotropic part of each ANISOU (U − U_eq·I), zeros for isotropic atoms;
    None when no atom is anisotropic or ``keep`` is false.  Refinement then refines the isotropic
    B on top of the deposited anisotropic shape (the shape itself is not refined)."""
    if not keep or not model.has_aniso.any():
        return None
    u = np.where(model.has_aniso[:, None], model.u_aniso, 0.0)
    u_eq = u[:, :3].mean(1)
    shape = u.copy()
    shape[:, :3] -= u_eq[:, None]
    return shape


_f_calc_jit = jax.jit(f_calc_of)


def update_xray_state(setup: Setup, problem: Problem, params: Params, rebuild_mask: bool = True) -> Problem:
    """Rebuild the solvent mask (F_mask), refit scales on the work set and re-estimate σA."""
    cfg, refl, model = setup.config, setup.refl, setup.model
    x = problem.xray
    xyz, _, occ = current_model_arrays(params, problem)
    f_mask = x.f_mask
    if rebuild_mask:
        fmask, _, _ = model_f_mask(model, model.crystal, refl.hkl, refl.d_min, r_probe=cfg.solvent.r_probe,
                                   r_shrink=cfg.solvent.r_shrink, xyz_cart=xyz)
        f_mask = jnp.asarray(fmask, x.f_mask.dtype)
    f_calc = _f_calc_jit(params, problem)
    scales = fit_scales(np.asarray(x.f_obs), np.asarray(f_calc), np.asarray(f_mask), np.asarray(x.s_cart),
                        np.asarray(x.work), model.crystal)
    scales = jax.tree_util.tree_map(lambda a: jnp.asarray(a, x.s2.dtype), scales)
    fm = f_model(f_calc, f_mask, x.s_cart, scales)
    sigma_a = estimate_sigma_a(np.asarray(x.f_obs), np.asarray(fm), np.asarray(x.sigma_a_use), np.asarray(x.bins),
                               np.asarray(x.centric), np.asarray(x.epsilon), np.asarray(x.sig_f_obs))
    sigma_a = sigma_a._replace(d=jnp.asarray(sigma_a.d, x.s2.dtype), s=jnp.asarray(sigma_a.s, x.s2.dtype))
    return cast_floats(problem._replace(xray=x._replace(f_mask=f_mask, scales=scales, sigma_a=sigma_a)), x.s2.dtype)


def _f_model_now(params, problem):
    x = problem.xray
    return f_model(_f_calc_jit(params, problem), x.f_mask, x.s_cart, x.scales)


def cycle_statistics(cycle: int, params: Params, problem: Problem, setup: Setup, t0: float) -> CycleStats:
    fm = np.asarray(_f_model_now(params, problem))
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


def refine(setup: Setup, n_cycles: int | None = None, strategy: str | None = None, callback=None) -> RefinementResult:
    """Run macrocycles on ``setup`` (see module docstring).

    Args:
        setup: from :func:`build_setup`.
        n_cycles: macrocycles (default from the config).
        strategy: rigid | xyz | b | xyz_b | xyz_b_occ (default from the config).
        callback: called with each CycleStats (progress display).
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
        if cfg.waters.remove_bad and "xyz" in blocks and (setup.model.kind == "water").any():
            problem, labels = remove_bad_waters(setup, problem, params)
            removed_labels += labels
        rebuild = cycle % max(cfg.solvent.update_every, 1) == 0
        problem = update_xray_state(setup, problem, params, rebuild_mask=rebuild)  # statistics with a fresh mask
        st = cycle_statistics(cycle, params, problem, setup, t0)
        history.append(st)
        _log_cycle(st, callback)
        warnings += _guard(history, cfg)
        if st.r_free < best[0] - 1e-6 or not cfg.guard.keep_best:
            best = (st.r_free, cycle, params, problem)
            best_setup = setup
        if cfg.waters.update_waters and "xyz" in blocks and cycle < len(plan):
            setup, params, problem, note = _pick_waters(setup, params, problem)
            if note:
                best = (history[-1].r_free, cycle, params, problem)  # atoms changed: older models are not comparable
                best_setup = setup
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


def _pick_waters(setup: Setup, params: Params, problem: Problem):
    """Water picking between macrocycles (waters.update_waters): remove bad waters, add waters at
    mFo−DFc peaks, and rebuild the problem for the new atoms (this recompiles the energy).

    Returns:
        (setup, params, problem, note): note is "" when nothing changed.
    """
    from ..io.build import with_coordinates
    from ..validate.waters import update_waters, water_params_from_config

    xyz, b, occ = current_model_arrays(params, problem)
    keep = occ > 0
    model_now = with_coordinates(setup.model, xyz_cart=xyz, b_iso=b, occ=occ)
    if not keep.all():
        model_now = model_now.subset(keep)
    upd = update_waters(model_now, setup.refl, water_params_from_config(setup.config), remove=setup.config.waters.remove_bad)
    if not upd.report["added"] and not upd.removed and keep.all():
        return setup, params, problem, ""
    new = build_setup(None, None, setup.config, model=upd.model, refl=setup.refl)
    note = f"waters: removed {upd.removed}, added {upd.report['added']} (now {upd.report['n_waters']})"
    log.info(note)
    return new, new.params, new.problem._replace(w_a=problem.w_a), note


def remove_bad_waters(setup: Setup, problem: Problem, params: Params):
    """Zero the occupancy of waters out of density (2mFo−DFc), with too high B, or clashing.

    Shapes stay fixed (no recompile): a removed water keeps its row with occupancy 0 and the
    writers leave it out.  One log line per removed water.

    Returns:
        (problem, labels of the waters removed now)
    """
    from ..io.build import with_coordinates
    from ..validate.density import model_maps
    from ..validate.waters import bad_waters, water_params_from_config

    xyz, b, occ = current_model_arrays(params, problem)
    model_now = with_coordinates(setup.model, xyz_cart=xyz, b_iso=b, occ=occ)
    maps = model_maps(model_now, setup.refl, f_calc=np.asarray(_f_calc_jit(params, problem)),
                      f_mask=np.asarray(problem.xray.f_mask))
    wp = water_params_from_config(setup.config)
    bad = bad_waters(model_now, maps, wp) & (occ > 0)
    labels = []
    for i in np.nonzero(bad)[0]:
        m = setup.model
        label = f"{m.chain_id[i]}/{m.res_name[i]} {m.res_seq[i]}"
        log.info("removed water %s (B %.1f Å²; out of density, above waters.max_b or clashing)", label, b[i])
        labels.append(label)
    occ0 = jnp.where(jnp.asarray(bad), 0.0, problem.maps.occ0).astype(problem.maps.occ0.dtype)
    return problem._replace(maps=problem.maps._replace(occ0=occ0)), labels


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
    from ..io.build import with_coordinates

    xyz, b, occ = current_model_arrays(result.params, result.problem)
    model = with_coordinates(result.setup.model, xyz_cart=xyz, b_iso=b, occ=occ)
    keep = ~np.asarray(result.removed_atoms, bool)
    return model if keep.all() else model.subset(keep)
