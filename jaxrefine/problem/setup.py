"""Building a refinement problem from a model and data.

:func:`build_setup` reads (or takes) the inputs and assembles the static arrays (``Problem``), the
starting ``Params`` and the first ``XrayState`` (see :mod:`jaxrefine.problem.xray_state` for how
the state is refreshed between macrocycles).
"""
from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from ..config import Config
from ..core.cache import enable_compilation_cache
from ..core.device import on_device, zeros_on_device
from ..errors import InputError, RestraintError
from ..io.formfactor_io import it92_form_factors
from ..io.hydrogens import riding_sites
from ..io.model import Model, read_model
from ..io.reflections import Reflections, check_compatible, read_reflections
from ..io.residue_edit import add_waters
from ..io.topology import build_restraints, find_monlib
from ..restraints import GeometryWeights
from ..xray.scaling import reciprocal_vectors
from ..xray.structure_factors import grid_resolution, make_sf_setup
from ..xray.targets import choose_sigma_a_set, sigma_a_bins
from .adp_model import atom_adp, build_adp_model, build_ncs, ncs_log_lines
from .neighbours import build_nonbonded
from .params import AtomMaps, Params, b_to_raw, occ_to_raw, occupancy_groups
from .problem import Problem, Setup, XrayData, XrayState, pad_reflections, reflection_bucket
from .riding import H_B_FACTOR, riding_from_sites
from .xray_state import cast_floats, update_xray_state, xray_state_spec

log = logging.getLogger("jaxrefine")

SF_B_MARGIN = 15.0  # Å²: the FFT spreading boxes hold Gaussians up to the starting B + this (room for B refinement)
# model.hydrogens: auto places riding hydrogens below this resolution.  Measured from the shaken starts (benchmarks/
# README.md, run h): riding H lowered R-free at 1.15-2.3 Å (4xof 0.198 -> 0.179, 1l2h, 5orl, 4iid by 0.004-0.007)
# and raised it at 2.9-3.2 Å (1va7 +0.008, 5kzb +0.019; servalcat's own F_model prefers 5kzb without them too).
RIDING_H_D_MIN = 2.5  # Å
# refine.strategy: auto refines the occupancies of alternate conformations (and of partly occupied residues)
# below this resolution, where the macrocycles minimise them with the coordinates and B (refine.blocks.JOINT_D_MAX,
# the same 2.5 Å): 4xof (1.15 Å, 178 altloc atoms) with the conformers' occupancies reset to 0.5 ended at R-free
# 0.1783 with them refined (their correlation with the deposited values 0.87) and 0.1809 with them fixed; from the
# deposited occupancies 0.1779 against 0.1774 (2026-12-03).
AUTO_OCC_D_MAX = 2.5  # Å
BODY_RADIUS_PAD = 1.0  # Å added to a rigid body's radius of gyration: rotations are optimised as arcs
#                        (radius × angle), and a one-atom body must not get radius 0


def rigid_bodies(model: Model, spec: str):
    """(n,) body index and (n_bodies, 3) centres for the spec "chain", "all" or "sel1; sel2".

    Atoms outside every selection form one extra body that never moves in rigid refinement
    only if it is listed; here they join the nearest listed body's index 0 (kept simple: chain
    bodies cover every atom).
    """
    if spec == "all":
        idx = np.zeros(model.n_atoms, np.int32)
    elif spec == "chain":
        _, idx = np.unique(model.chain_id, return_inverse=True)
    else:
        idx = np.full(model.n_atoms, -1, np.int32)
        for k, sel in enumerate(s for s in spec.split(";") if s.strip()):
            idx[model.select(sel) & (idx < 0)] = k
        if (idx < 0).any():
            idx[idx < 0] = idx.max() + 1
    idx = idx.astype(np.int32)
    n_b = int(idx.max()) + 1
    centres = np.stack([model.xyz_cart[idx == b].mean(0) for b in range(n_b)])
    return idx, centres


def initial_params(model: Model, maps: AtomMaps, group_start, group_set, set_total, set_size, dtype) -> Params:
    n_b = maps.body_centre.shape[0]
    return Params(
        xyz_frac=on_device(model.xyz_frac, dtype),
        b_raw=on_device(b_to_raw(model.b_iso, float(maps.b_min)), dtype),
        occ_raw=on_device(occ_to_raw(group_start, group_set, set_total, set_size), dtype),
        rot=zeros_on_device((n_b, 3), dtype),
        trans=zeros_on_device((n_b, 3), dtype),
    )


def choose_hydrogens(mode: str, d_min: float, model: Model) -> tuple:
    """(mode, reason) of ``model.hydrogens``: ``mode`` itself unless it is ``auto``, which rides the library's
    hydrogens on the atoms below RIDING_H_D_MIN and leaves them out otherwise.  A model that arrives with
    hydrogens (passed in, read with them) keeps its own under ``auto``, as the former default did."""
    if mode != "auto":
        return mode, f"model.hydrogens={mode}"
    if np.asarray(model.is_hydrogen).any():
        return "keep", f"auto: the model holds {int(np.sum(model.is_hydrogen))} hydrogens of its own"
    if d_min < RIDING_H_D_MIN:
        return "riding", f"auto: d_min {d_min:.2f} Å < {RIDING_H_D_MIN} Å"
    return "remove", f"auto: d_min {d_min:.2f} Å >= {RIDING_H_D_MIN} Å"


def hydrogens_and_sites(mode: str, d_min: float, model: Model, monlib=None, ligands=()):
    """((mode, reason), RidingSites or None): :func:`choose_hydrogens`, and the riding hydrogens placed when it
    chose them.  Under ``auto`` a placement that fails, or a dictionary that places none (the built-in one),
    leaves the hydrogens out instead of stopping the run; an explicit ``riding`` raises."""
    h_mode = choose_hydrogens(mode, d_min, model)
    if h_mode[0] != "riding":
        return h_mode, None
    try:
        sites = riding_sites(model, monlib, ligands)
    except RestraintError as exc:
        if mode != "auto":
            raise
        log.warning("riding hydrogens left out: %s", exc)
        return ("remove", f"{h_mode[1]}, but {exc}"), None
    if sites.n == 0 and mode == "auto":
        return ("remove", h_mode[1] + ", but the restraint dictionary places none"), None
    return h_mode, sites


def choose_strategy(setting: str, d_min: float, model: Model) -> tuple:
    """(strategy, reason) for ``refine.strategy``: the setting itself, or for ``auto`` xyz_b_occ when the data
    reach beyond AUTO_OCC_D_MAX and the model has occupancy groups (alternate conformations, partly occupied
    residues other than water: :func:`jaxrefine.problem.params.occupancy_groups`), else xyz_b."""
    if setting != "auto":
        return setting, f"refine.strategy {setting}"
    n = int((occupancy_groups(model, refine_partial=True)[0] >= 0).sum())
    if not n:
        return "xyz_b", "auto: no alternate conformations or partly occupied residues"
    what = f"{n} atoms in alternate conformations or partly occupied residues"
    if d_min >= AUTO_OCC_D_MAX:
        return "xyz_b", f"auto: d_min {d_min:.2f} Å >= {AUTO_OCC_D_MAX} Å, occupancies of the {what} kept"
    return "xyz_b_occ", f"auto: d_min {d_min:.2f} Å < {AUTO_OCC_D_MAX} Å, occupancies of the {what} refined"


def load_inputs(model_path, data_path, cfg: Config):
    """Read and check model and data files as the configuration says."""
    from ..io.writers import protect

    protect(model_path, data_path)
    model = read_model(model_path, hydrogens=(cfg.model.hydrogens == "keep"))  # auto and riding: the library's
    d = cfg.data
    refl = read_reflections(
        data_path, labin=d.labin, free_value=d.free_value, free_fraction=d.free_fraction,
        free_seed=d.free_seed, d_min=d.d_min, d_max=d.d_max,
    )
    check_compatible(model.crystal, refl.crystal, os.fspath(model_path), os.fspath(data_path))
    m = cfg.model
    if m.place_rotation or m.place_translation or m.place_translation_frac:
        from ..io.placement import place_model

        model = place_model(model, m.place_rotation or None, m.place_translation or None, m.place_translation_frac or None)
        log.info("%s: placed with rotation %s and translation %s", model_path, list(m.place_rotation),
                 list(m.place_translation or m.place_translation_frac))
    if refl.n_free == 0:
        raise InputError(f"{data_path}: the free set is empty; pass data.free_value or remove the flag column to generate one")
    return model, refl


# ----------------------------------------------------------------------------- setup
def _dtype(cfg: Config):
    """Working precision: the config's, float32 when x64 is not enabled in JAX."""
    if cfg.refine.precision == "float64" and jax.config.jax_enable_x64:
        return jnp.float64
    if cfg.refine.precision == "float64":
        log.warning("refine.precision=float64 needs jax.config.update('jax_enable_x64', True); using float32")
    return jnp.float32


def geometry_weights(cfg: Config, dtype) -> GeometryWeights:
    """The per-term geometry weights of ``cfg.weights`` (the one place they are built); terms the
    config does not name (``adp``) weigh 1."""
    w = cfg.weights
    return GeometryWeights(**{f: on_device(getattr(w, f, 1.0), dtype) for f in GeometryWeights._fields})


def refine_hkl_free(refl):
    """The σA reflection set: the free set when large enough, else the work set (as servalcat)."""
    use, _ = choose_sigma_a_set(refl.free)
    return use


# Rigid bodies exist in the parameters only where a macrocycle refines them: the transform about each body's centre
# (a gather of (n, 3, 3) rotations and its scatter-add gradient) made the energy gradient of 1va7 compile in 2.4 s
# instead of 2.1 s and evaluate in 18.9 instead of 17.6 ms (5e5z: 1.38 -> 1.28 s to compile; benchmarks/README.md).
def uses_rigid_bodies(strategy: str, rigid_first: bool) -> bool:
    """Whether a refinement with ``strategy`` (resolved, not auto) and ``refine.rigid_first`` refines rigid bodies."""
    return strategy == "rigid" or bool(rigid_first)


def _bodies(model: Model, spec: str, refined: bool):
    """(body index (n,), centres (n_bodies, 3), radii (n_bodies,)) of ``refine.rigid_bodies`` = ``spec``; no bodies
    (index 0 for every atom, (0, 3) centres) unless ``refined``."""
    if not refined:
        return np.zeros(model.n_atoms, np.int32), np.zeros((0, 3)), np.zeros(0)
    idx, centres = rigid_bodies(model, spec)
    radii = np.array([np.sqrt(((model.xyz_cart[idx == b] - c) ** 2).sum(1).mean()) + BODY_RADIUS_PAD
                      for b, c in enumerate(centres)])
    return idx, centres, radii


def with_rigid_bodies(setup: Setup) -> Setup:
    """``setup`` with the rigid bodies of its ``refine.rigid_bodies``, where it was built for a strategy without them
    (e.g. ``refine(setup, strategy="rigid")`` on a setup built for xyz_b); the setup itself where it has them."""
    if setup.params.rot.shape[0] > 0:
        return setup
    idx, centres, radii = _bodies(setup.model, setup.config.refine.rigid_bodies, True)
    dtype = setup.problem.maps.orth.dtype
    maps = setup.problem.maps._replace(body_index=on_device(idx), body_centre=on_device(centres, dtype),
                                       body_radius=on_device(radii, dtype))
    params = setup.params._replace(rot=zeros_on_device((len(centres), 3), dtype),
                                   trans=zeros_on_device((len(centres), 3), dtype))
    return setup._replace(problem=setup.problem._replace(maps=maps), params=params)


def atom_maps_and_params(model: Model, cfg: Config, dtype, strategy: str | None = None):
    """(:class:`AtomMaps`, starting :class:`Params`) of a model: rigid bodies (for ``strategy``, default
    ``cfg.refine.strategy``: rigid, or any with ``refine.rigid_first``; none otherwise, see ``uses_rigid_bodies``),
    occupancy groups (xyz_b_occ has them), B floor."""
    strategy = strategy or cfg.refine.strategy
    idx, centres, radii = _bodies(model, cfg.refine.rigid_bodies, uses_rigid_bodies(strategy, cfg.refine.rigid_first))
    refine_occ = strategy == "xyz_b_occ"
    occ_group, group_set, set_total, set_size, group_start = occupancy_groups(model, refine_partial=refine_occ)
    if not refine_occ:
        occ_group = -np.ones(model.n_atoms, np.int32)
        group_set = group_start = np.zeros(0)
        set_total = set_size = np.zeros(0)
    maps = AtomMaps(  # on_device: jnp.asarray of host data compiles a program per shape (core/device.py)
        orth=on_device(model.crystal.orth, dtype),
        frac=on_device(model.crystal.frac, dtype),
        body_index=on_device(idx),
        body_centre=on_device(centres, dtype),
        body_radius=on_device(radii, dtype),
        occ0=on_device(model.occ, dtype),
        occ_group=on_device(occ_group, jnp.int32),
        group_set=on_device(group_set, jnp.int32),
        set_total=on_device(set_total, dtype),
        set_size=on_device(set_size, jnp.int32),
        b_min=on_device(cfg.refine.b_min, dtype),
    )
    params = initial_params(model, maps, np.asarray(group_start, float), np.asarray(group_set, np.int32),
                            np.asarray(set_total, float), np.asarray(set_size, np.int32), dtype)
    return maps, params


def xray_data(refl: Reflections, dtype, n: int | None = None) -> XrayData:
    """The observed data as arrays, with the σA reflection set and bins, padded to ``n`` reflections (default
    :func:`reflection_bucket` of the data's count; see :class:`XrayData`)."""
    use = refine_hkl_free(refl)
    n = reflection_bucket(refl.n) if n is None else int(n)
    pad = lambda a: pad_reflections(a, n)  # noqa: E731
    real = pad(np.ones(refl.n, bool))
    real[refl.n:] = False
    return XrayData(
        hkl=on_device(pad(refl.hkl)), s2=on_device(pad(refl.s2), dtype),
        s_cart=on_device(pad(reciprocal_vectors(refl.hkl, refl.crystal)), dtype),
        sigma_a_use=on_device(pad(use) & real), f_obs=on_device(pad(refl.f_obs), dtype),
        sig_f_obs=on_device(pad(refl.sig_f_obs), dtype), work=on_device(pad(~refl.free) & real),
        free=on_device(pad(refl.free) & real), centric=on_device(pad(refl.centric)),
        epsilon=on_device(pad(refl.epsilon), dtype), bins=on_device(pad(sigma_a_bins(refl.d, use))),
        observed=on_device(real),
    )


def build_setup(model_path, data_path, cfg: Config | None = None, model=None, refl=None, on_problem=None) -> Setup:
    """Read the inputs and build the static problem, the starting parameters and the first X-ray state.

    Args:
        model_path, data_path: files (ignored when ``model``/``refl`` are given).
        cfg: configuration (defaults when None).
        model, refl: already-read inputs (for notebooks and tests).
        on_problem: called as ``on_problem(problem, params, state_spec, refl, strategy)`` once the problem is built
            and before the X-ray state is fitted (``state_spec``: :func:`xray_state_spec`, the state's shapes;
            ``strategy``: the refinement strategy chosen, e.g. xyz_b for ``refine.strategy: auto``), e.g.
            to compile the minimiser meanwhile (:func:`jaxrefine.refine.engine.prepare_refinement`).
    """
    cfg = cfg or Config()
    # the persistent compilation cache (runtime.compilation_cache), as the CLI and refine() turn it on: a script,
    # notebook or test that builds a problem loads the programs an earlier process compiled for the same shapes
    enable_compilation_cache(cfg.runtime.compilation_cache, cfg.runtime.cache_max_mb)
    if model is None or refl is None:
        model, refl = load_inputs(model_path, data_path, cfg)
    dtype = _dtype(cfg)
    strategy, why = choose_strategy(cfg.refine.strategy, refl.d_min, model)  # the loop reads it from the setup
    log.info("strategy: %s (%s)", strategy, why)
    model, spare = with_spare_waters(model, refl, cfg, strategy)
    monlib = find_monlib(cfg.model.monlib)
    restraints = cast_floats(build_restraints(model, monlib=monlib, ligands=cfg.model.ligands), dtype)
    maps, params = atom_maps_and_params(model, cfg, dtype, strategy)
    u_shape = anisotropic_shape(model, cfg.refine.keep_anisou)
    adp, params, b_sf, u_sf, choice = adp_model_and_params(model, refl, cfg, restraints, u_shape, params, dtype)
    if adp is not None:
        u_shape = None  # kept inside the ADP model for the atoms it leaves isotropic
    ncs, copies = build_ncs(model, cfg.restraints.ncs, cfg.restraints.ncs_weight)
    for line in [f"ADP model: {choice.mode} ({choice.reason})"] + ncs_log_lines(ncs, copies):
        log.info(line)
    h_mode, sites = hydrogens_and_sites(cfg.model.hydrogens, refl.d_min, model, monlib, cfg.model.ligands)
    riding, elements, iso_atoms = None, model.element, None
    log.info("hydrogens: %s (%s)", *h_mode)
    if sites is not None:  # F_calc sums over the atoms, then their riding hydrogens
        riding = riding_from_sites(sites, dtype)
        elements = np.concatenate([model.element, sites.element])
        b_sf = np.concatenate([np.asarray(b_sf, float), H_B_FACTOR * np.asarray(b_sf, float)[sites.parent]])
        if u_sf is not None:  # riding hydrogens are isotropic (problem.xray_state.f_calc_of): their own box classes
            u_sf = np.concatenate([np.asarray(u_sf, float), np.zeros((sites.n, 6))])
            iso_atoms = np.arange(len(elements)) >= model.n_atoms
        log.info("riding hydrogens: %d", sites.n)
    _check_cell_range(cfg.runtime.cell_range, model.crystal.cell, model_path)
    corners, steps = corner_cells(cfg.runtime.cell_range), grid_steps(cfg)
    d_grid = grid_resolution(refl.d_min, steps)
    n_refl = problem_reflection_count(refl, model.crystal, d_grid if steps else None, corners)
    sf = make_sf_setup(model.crystal, pad_reflections(refl.hkl, n_refl), it92_form_factors(elements, model.source),
                       d_min=d_grid, b_iso=b_sf, b_margin=SF_B_MARGIN, dtype=dtype, u_aniso=u_sf, iso_atoms=iso_atoms,
                       reuse_classes=cfg.runtime.reuse_box_classes, layout_cells=corners)
    problem = Problem(
        maps=maps, sf=sf, xray=xray_data(refl, dtype, n_refl), restraints=restraints,
        geo_weights=geometry_weights(cfg, dtype), w_b=on_device(cfg.weights.w_b, dtype),
        u_shape=None if u_shape is None else on_device(u_shape, dtype),
        adp=cast_floats(adp, dtype), ncs=cast_floats(ncs, dtype), riding=riding,
    )
    state = XrayState(  # w_A is chosen by the loop; mask, scales and σA are fitted just below
        f_mask=zeros_on_device(n_refl, jnp.complex128 if dtype == jnp.float64 else jnp.complex64), scales=None,
        sigma_a=None, nonbonded=cast_floats(build_nonbonded(model, restraints, model.crystal), dtype),
        w_a=on_device(1.0, dtype),
    )
    setup = Setup(problem=problem, params=params, state=state, model=model, refl=refl, config=cfg, monlib=monlib,
                  adp_choice=choice, ncs_copies=tuple(copies), hydrogens=h_mode, strategy=(strategy, why),
                  spare_waters=spare)
    if on_problem is not None:
        on_problem(problem, params, xray_state_spec(problem, state.nonbonded, refl.d_min), refl, strategy)
    return setup._replace(state=update_xray_state(setup, problem, state, params))


# Water picking (waters.update_waters) fills slots made here rather than rebuilding the problem: each added water
# changed every per-atom shape and the FFT layout, and each round compiled the minimiser again (4xof from a shaken
# start, 5 cycles, cold: 36 s with 31 s of compiling, against 10 s without picking).
SPARE_WATER_FRACTION = 0.5  # slots: this x max(waters, residues / 2), the base of waters.max_new_fraction (a round
# that picks more rebuilds the problem once, with slots for the new count)
SPARE_WATER_MIN = 16
SPARE_WATER_B = 1.25  # their B (for the FFT boxes): this x the mean B of the waters (of all atoms without waters)


def spare_water_count(model: Model) -> int:
    """How many water slots :func:`with_spare_waters` adds to ``model``."""
    n_water = int(((model.kind == "water") & ~model.is_hydrogen & (model.occ > 0)).sum())
    return max(SPARE_WATER_MIN, int(np.ceil(SPARE_WATER_FRACTION * max(n_water, model.n_residues // 2))))


def with_spare_waters(model: Model, refl: Reflections, cfg: Config, strategy: str):
    """(model, spare): ``model`` with :func:`spare_water_count` waters of occupancy 0 appended (a chain of their
    own, at the model's centre) when water picking will run (``waters.update_waters``, data to
    ``waters.max_d_min``, a strategy that refines coordinates), and spare ((n,) bool, the slots) — or ``model``
    and None.  Occupancy 0 keeps a slot out of F_calc, the solvent mask, the non-bonded list and the written model
    until :func:`jaxrefine.validate.waters.pick_waters_hook` puts a new water in it."""
    w = cfg.waters
    if not w.update_waters or refl.d_min > w.max_d_min or "xyz" not in strategy or model.structure is None:
        return model, None
    k = spare_water_count(model)
    waters = (model.kind == "water") & (model.occ > 0)
    b = SPARE_WATER_B * float(model.b_iso[waters].mean() if waters.any() else model.b_iso.mean())
    n0 = model.n_atoms
    model = add_waters(model, np.repeat(model.xyz_cart.mean(0)[None], k, 0), np.full(k, b), occ=0.0)
    return model, np.arange(model.n_atoms) >= n0


def problem_reflection_count(refl: Reflections, crystal, d_grid: float | None = None, cells=()) -> int:
    """The problem's padded reflection count (:class:`XrayData`): the data's count in its size bucket
    (:func:`reflection_bucket`); with the grid made for a resolution step ``d_grid`` (``runtime.grid_steps``), at
    least the count of every unique reflection to ``d_grid`` in the model's cell or the largest of ``cells`` (a
    crystal form's range), so that crystals of one step and range, whatever their completeness or d_min within the
    step, get one count and share compiled programs (the pads are in no set: up to ~1.14x the reflections a
    complete dataset to the data's own d_min holds)."""
    n = refl.n
    if d_grid is not None:
        from ..core.crystal import with_cell
        from ..io.miller_io import unique_miller_indices

        n = max([n] + [len(unique_miller_indices(with_cell(crystal, c), d_grid)) for c in [crystal.cell, *cells]])
    return reflection_bucket(n)


def grid_steps(cfg: Config) -> int:
    """``runtime.grid_steps`` resolved: auto is 0 here (a single refinement's grid made for its own d_min);
    :func:`jaxrefine.fleet.driver.refine_many` gives the entries of a crystal form with others in the screen its
    FLEET_GRID_STEPS (:func:`jaxrefine.fleet.driver.entry_configs`)."""
    steps = cfg.runtime.grid_steps
    return 0 if steps == "auto" else int(steps)


def corner_cells(cell_range) -> list:
    """The corners (a, b, c, α, β, γ) of ``runtime.cell_range`` ([[lowest], [highest]]; each parameter at its lowest
    or highest, the distinct ones): the cells the FFT layout is made to serve besides the model's own (the layout's
    boxes and grid spacing change monotonically enough over a range of ~1 % that its corners bound it; a cell inside
    that needed more only gets a layout of its own); none for auto and []."""
    if isinstance(cell_range, str) or not cell_range:
        return []
    import itertools

    lo, hi = (tuple(float(x) for x in c) for c in cell_range)
    return sorted(set(itertools.product(*({a, b} for a, b in zip(lo, hi)))))


def _check_cell_range(cell_range, cell, where) -> None:
    """Warn when ``runtime.cell_range`` leaves out the model's own cell (another crystal form's range: the FFT layout
    then serves both, with a finer grid or larger boxes than either needs)."""
    if isinstance(cell_range, str) or not cell_range:
        return
    lo, hi = (np.asarray(c, float) for c in cell_range)
    cell = np.asarray(cell, float)
    if np.any(cell < lo - 1e-3) or np.any(cell > hi + 1e-3):
        log.warning("%s: the cell %s is outside runtime.cell_range %s; the FFT layout serves both (slower)",
                    where or "model", np.round(cell, 3).tolist(), [list(lo), list(hi)])


def rebuild_setup(setup: Setup, model: Model) -> Setup:
    """A setup for ``model`` (e.g. after water picking, written by :func:`model_of` with its ANISOU and
    TLS groups) that keeps the ADP model chosen for ``setup``: the same mode (``auto`` is not
    chosen again) and, for TLS, the groups read back from the model (refined T, L, S and residual B); rigid bodies
    (new ones, about the new model's centres) where ``setup`` has them."""
    import dataclasses

    cfg = setup.config
    if setup.adp_choice is not None:
        tls = "auto" if setup.adp_choice.tls is not None else cfg.refine.tls_groups
        cfg = dataclasses.replace(cfg, refine=dataclasses.replace(cfg.refine, adp=setup.adp_choice.mode, tls_groups=tls))
    new = build_setup(None, None, cfg, model=model, refl=setup.refl)
    # rigid bodies where the refinement had them (refine(setup, strategy="rigid") on a setup built for another)
    return with_rigid_bodies(new) if setup.params.rot.shape[0] > 0 else new


def adp_model_and_params(model, refl, cfg: Config, restraints, u_shape, params: Params, dtype):
    """The ADP model of ``cfg.refine.adp`` and the parameters that start it.

    Returns:
        (AdpModel or None, params with b_raw / u_raw / tls_raw set, b_sf (n,) and u_sf (n, 6) or None
        at the start (for the structure-factor boxes), AdpChoice)
    """
    bond, angle = restraints.bond, restraints.angle
    pairs = (np.asarray(bond.idx)[np.asarray(bond.mask) > 0], np.asarray(angle.idx)[np.asarray(angle.mask) > 0][:, [0, 2]])
    adp, u_raw, tls_raw, b_start, choice = build_adp_model(
        model, cfg.refine.adp, cfg.refine.tls_groups, cfg.refine.b_min, refl.d_min, int((~refl.free).sum()),
        u_shape=u_shape, pairs=pairs)
    if adp is None:
        return None, params, model.b_iso, u_shape, choice
    params = params._replace(
        b_raw=on_device(b_to_raw(b_start, cfg.refine.b_min), dtype),
        u_raw=None if u_raw is None else on_device(u_raw, dtype),
        tls_raw=None if tls_raw is None else on_device(tls_raw, dtype),
    )
    # the starting ADPs on the host, in numpy (no XLA program; the setup waits for it before the problem exists)
    b_sf, u_sf, _ = atom_adp(np.maximum(np.asarray(b_start, float), cfg.refine.b_min), u_raw, tls_raw,
                             np.asarray(model.xyz_cart, float), jax.tree_util.tree_map(np.asarray, adp), None)
    return adp, params, b_sf, u_sf, choice


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
