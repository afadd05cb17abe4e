"""Water picking from mFo−DFc peaks, and removal of waters without density.

A new water is a peak of the σA-weighted mFo−DFc map above ``min_peak_sigma`` (and of 2mFo−DFc
above ``min_two_fofc_sigma``), within hydrogen-bonding distance (``min_hbond``..``max_hbond``) of a
polar atom (N, O, including other waters) and no closer than ``clash_distance`` to any atom, all
symmetry copies considered (the usual automated criteria, e.g. Lamzin & Wilson 1993, Acta Cryst.
D49, 129; Terwilliger et al. 2006, Acta Cryst. D62, 915).  A water is bad when the 2mFo−DFc at its
oxygen is below ``min_density_sigma``, its B is above ``max_b``, or it clashes.

Peak positions are refined below the grid spacing by a parabola through the three grid values
along each axis (the Newton step of a separable quadratic fit).
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from ..config import WaterConfig
from ..core.device import on_device
from ..io.model import metal_atoms
from .density import sample_map

log = logging.getLogger(__name__)
POLAR = ("N", "O")


def find_peaks(values, threshold: float):
    """Local maxima of a periodic map above a threshold, refined below the grid spacing.

    Args:
        values: (na, nb, nc) unit-cell map.
        threshold: absolute level.

    Returns:
        (m, 3) fractional positions in [0, 1) and (m,) heights (interpolated), highest first.
    """
    v = np.asarray(values)
    is_max = v > threshold
    for da in (-1, 0, 1):
        for db in (-1, 0, 1):
            for dc in (-1, 0, 1):
                if da == db == dc == 0:
                    continue
                is_max &= v >= np.roll(v, (da, db, dc), axis=(0, 1, 2))
    idx = np.argwhere(is_max)
    shape = np.asarray(v.shape)
    offs = np.zeros(idx.shape)
    for a in range(3):
        e = np.zeros(3, np.int64)
        e[a] = 1
        lo = (idx - e) % shape
        hi = (idx + e) % shape
        vm, v0, vp = v[tuple(lo.T)], v[tuple(idx.T)], v[tuple(hi.T)]
        den = vm - 2 * v0 + vp
        with np.errstate(invalid="ignore", divide="ignore"):
            offs[:, a] = np.where(den < 0, 0.5 * (vm - vp) / den, 0.0)
    frac = ((idx + np.clip(offs, -0.5, 0.5)) / shape[None]) % 1.0
    height = sample_map(v, frac)
    order = np.argsort(-height)
    return frac[order], height[order]


def _images(frac, crystal, centre):
    """(n_ops·27, 3) Cartesian images of one fractional point near the fractional ``centre``."""
    lattice = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    g = np.einsum("oij,j->oi", np.asarray(crystal.rot, float), frac) + np.asarray(crystal.trans, float)
    g = g - np.floor(g - centre + 0.5)
    return crystal.to_cart((g[:, None, :] + lattice[None]).reshape(-1, 3))


def pick_waters(model, maps, params: WaterConfig = WaterConfig()):
    """New water positions at mFo−DFc peaks that satisfy the distance criteria.

    Args:
        model: :class:`jaxrefine.io.model.Model` that phased ``maps`` (hydrogens ignored).
        maps: :class:`jaxrefine.validate.density.ModelMaps`.
        params: :class:`jaxrefine.config.WaterConfig` (the ``waters`` section of the configuration).

    Returns:
        (k, 3) Cartesian positions (Å, the symmetry copy next to its hydrogen-bond partner) and (k,)
        mFo−DFc peak heights (σ).
    """
    crystal = maps.crystal
    heavy = ~model.is_hydrogen
    xyz = model.xyz_cart[heavy]
    polar = np.isin(np.char.upper(model.element[heavy].astype(str)), POLAR)
    tree_all = cKDTree(xyz)
    tree_polar = cKDTree(xyz[polar])
    centre = crystal.to_frac(xyz).mean(0)
    frac, height = find_peaks(maps.fofc, params.min_peak_sigma * maps.sigma_diff)
    two = sample_map(maps.two_fofc, frac) / maps.sigma_two
    accepted, heights = [], []
    for f, h, t in zip(frac, height, two):
        if t < params.min_two_fofc_sigma:
            continue
        img = _images(f, crystal, centre)
        d_all, _ = tree_all.query(img)
        if d_all.min() < params.clash_distance:
            continue
        d_pol, _ = tree_polar.query(img)
        ok = (d_pol >= params.min_hbond) & (d_pol <= params.max_hbond)
        if not ok.any():
            continue
        if accepted and np.min(np.linalg.norm(img[:, None, :] - np.asarray(accepted)[None], axis=-1)) < params.min_water_distance:
            continue
        # a peak on or next to a symmetry element sees its own copies: reject (no special positions)
        if np.sum(np.linalg.norm(img - img[np.argmin(np.where(ok, d_pol, np.inf))], axis=1) < params.min_water_distance) > 1:
            continue
        accepted.append(img[np.argmin(np.where(ok, d_pol, np.inf))])
        heights.append(h / maps.sigma_diff)
    return np.asarray(accepted, float).reshape(-1, 3), np.asarray(heights, float)


def bad_waters(model, maps, params: WaterConfig = WaterConfig()) -> np.ndarray:
    """(n_atoms,) bool: water atoms with 2mFo−DFc < min_density_sigma, B > max_b, or a clash.

    A clash is a non-water atom (symmetry copies included) closer than ``clash_distance``, or closer
    than ``min_polar_contact`` for N/O partners and metals (short hydrogen bonds and metal contacts are real).
    Atoms of an alternate conformation clash only with waters of the same altloc (different
    conformers are not present together).
    """
    water = (model.kind == "water") & ~model.is_hydrogen
    bad = np.zeros(model.n_atoms, bool)
    if not water.any():
        return bad
    w_idx = np.nonzero(water)[0]
    dens = sample_map(maps.two_fofc, maps.crystal.to_frac(model.xyz_cart[w_idx])) / maps.sigma_two
    bad[w_idx] = (dens < params.min_density_sigma) | (model.b_iso[w_idx] > params.max_b)
    other = ~model.is_hydrogen & (model.kind != "water")
    # N/O partners and metals may sit closer than clash_distance (hydrogen bonds; metal coordination
    # at 2.0-2.3 Å: 5orl's Mg-bound waters were removed as clashes from a shaken start, R-free +0.009)
    polar = np.isin(np.char.upper(model.element.astype(str)), POLAR) | metal_atoms(model.element)
    for alt in np.unique(model.altloc[w_idx]):
        ws = w_idx[model.altloc[w_idx] == alt]
        same = (model.altloc == "") | (model.altloc == alt) if alt else model.altloc == ""
        for partners, limit in ((other & same & ~polar, params.clash_distance), (other & same & polar, params.min_polar_contact)):
            d = nearest_distance(model.xyz_cart[ws], model.xyz_cart[partners], maps.crystal, limit)
            bad[ws] |= d < limit
    return bad


def nearest_distance(points_cart, atoms_cart, crystal, cutoff: float) -> np.ndarray:
    """(m,) distance (Å) from each point to the nearest atom or symmetry copy; inf beyond ``cutoff``.

    A symmetry operator is an isometry, so |p − S(a)| = |S⁻¹(p) − a|: the few points are carried by the
    inverse of every operator (and lattice shifts −1..1 about the atoms' cell) and looked up in one tree of
    the atoms, instead of every copy of every atom in a tree of the points (4iid: 14.8k atoms × 4 operators
    × 27 shifts per call).
    """
    points_cart = np.asarray(points_cart, float).reshape(-1, 3)
    atoms_cart = np.asarray(atoms_cart, float).reshape(-1, 3)
    d = np.full(len(points_cart), np.inf)
    if len(atoms_cart) == 0 or len(points_cart) == 0:
        return d
    tree = cKDTree(atoms_cart)
    p_frac = crystal.to_frac(points_cart)
    centre = crystal.to_frac(atoms_cart).mean(0)
    lattice = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    for rot, trans in zip(np.asarray(crystal.rot, float), np.asarray(crystal.trans, float)):
        q = (p_frac - trans) @ np.linalg.inv(rot).T  # S⁻¹(p), fractional
        q = q - np.floor(q.mean(0) - centre + 0.5)  # near the atoms' cell
        # the 27 lattice shifts in one query (one per shift cost 4iid ~20 ms a water check)
        dd, _ = tree.query(crystal.to_cart((q[None] + lattice[:, None]).reshape(-1, 3)), distance_upper_bound=cutoff)
        d = np.minimum(d, dd.reshape(len(lattice), -1).min(0))
    return d


class WaterUpdate(NamedTuple):
    """Result of :func:`update_waters`: the new model and what changed."""

    model: object
    added: np.ndarray
    removed: int
    report: dict


class WaterChanges(NamedTuple):
    """What one round of water picking changes in a model (:func:`water_changes`)."""

    removed: np.ndarray  # (n_atoms,) bool: the atoms of the waters removed
    added: np.ndarray  # (k, 3) Cartesian positions (Å) of the new waters
    b_new: float  # their B (Å²): the mean B of the waters kept (of all atoms without waters)
    heights: np.ndarray  # (k,) their mFo−DFc peaks (σ)


def water_changes(model, refl, params: WaterConfig = WaterConfig(), maps=None, remove: bool = True) -> WaterChanges:
    """The waters one round removes (bad ones, when ``remove``) and the new ones it adds at mFo−DFc peaks (see
    :func:`update_waters`, which applies them to the model)."""
    from .density import model_maps

    maps = model_maps(model, refl) if maps is None else maps
    removed = np.zeros(model.n_atoms, bool)
    if remove:
        bad = bad_waters(model, maps, params)
        removed = np.isin(model.res_index, np.unique(model.res_index[bad]))
    kept = model.subset(~removed) if removed.any() else model
    new_xyz, heights = pick_waters(kept, maps, params)
    n_water = int((kept.kind == "water").sum())
    limit = int(np.ceil(params.max_new_fraction * max(n_water, kept.n_residues // 2, 1)))
    waters = kept.kind == "water"
    b_new = float(kept.b_iso[waters].mean()) if waters.any() else float(kept.b_iso.mean())
    return WaterChanges(removed, new_xyz[:limit], b_new, heights[:limit])


def update_waters(model, refl, params: WaterConfig = WaterConfig(), maps=None, remove: bool = True) -> WaterUpdate:
    """Remove bad waters, then add waters at mFo−DFc peaks (one round; run between macrocycles).

    Args:
        model: :class:`jaxrefine.io.model.Model` with a gemmi structure.
        refl: its reflections.
        params: :class:`jaxrefine.config.WaterConfig` (the ``waters`` section of the configuration).
        maps: :class:`ModelMaps` of ``model`` (computed when None).
        remove: remove bad waters first (config ``waters.remove_bad``).

    Returns:
        :class:`WaterUpdate` (added: (k, 3) positions of the new waters).
    """
    from ..io.residue_edit import add_waters

    ch = water_changes(model, refl, params, maps, remove)
    n_removed = int(np.unique(model.res_index[ch.removed]).size)
    if n_removed:
        model = model.subset(~ch.removed)
    if len(ch.added):
        model = add_waters(model, ch.added, np.full(len(ch.added), ch.b_new))
    report = _water_report(n_removed, ch, int((model.kind == "water").sum()))
    return WaterUpdate(model, ch.added, n_removed, report)


def _water_report(n_removed: int, ch: WaterChanges, n_waters: int) -> dict:
    """The round's report (and its log line)."""
    log.info("waters: removed %d, added %d (now %d)", n_removed, len(ch.added), n_waters)
    return {"removed": n_removed, "added": int(len(ch.added)), "n_waters": n_waters,
            "peak_sigma": [round(float(h), 2) for h in ch.heights]}


# ------------------------------------------------------------------ actions between macrocycles
def water_hooks(cfg) -> dict:
    """The water actions the configuration asks for, as keyword arguments of
    :func:`jaxrefine.refine.engine.refine` / :func:`jaxrefine.refine.run.run_refinement`:
    ``after_minimise`` removes bad waters (``waters.remove_bad``), ``between_cycles`` picks new
    ones (``waters.update_waters``).  ``refine(setup, **water_hooks(cfg))``."""
    w, told = cfg.waters, []  # one "waters kept as they are" line for both actions
    return {"after_minimise": [remove_bad_waters_hook(w, told)] if w.remove_bad else [],
            "between_cycles": [pick_waters_hook(w, remove=w.remove_bad, told=told)] if w.update_waters else []}


def waters_apply(ctx, params: WaterConfig, told: list | None = None) -> bool:
    """Whether the water actions run on this refinement: data to ``params.max_d_min`` or better.  When they do
    not, the log says so once: ``told`` is a list shared by the actions of one refinement (an empty one the
    first time; None: say it every time)."""
    d_min = float(ctx.setup.refl.d_min)
    if d_min <= params.max_d_min:
        return True
    if not told:
        log.info("waters kept as they are: d_min %.2f Å is beyond waters.max_d_min %.1f Å", d_min, params.max_d_min)
        if told is not None:
            told.append(d_min)
    return False


def remove_bad_waters_hook(params: WaterConfig = WaterConfig(), told: list | None = None):
    """Action: zero the occupancy of waters out of density (2mFo−DFc), with too high B, or clashing,
    after each coordinate macrocycle.

    Shapes stay fixed (no recompile): a removed water keeps its row with occupancy 0 and the
    writers leave it out.  One log line per removed water.  Nothing happens with data beyond
    ``params.max_d_min`` (see :func:`waters_apply`; ``told``: its shared list, a new one by default).
    """
    told = [] if told is None else told

    def remove_bad(ctx):
        setup, problem, params_now = ctx.setup, ctx.problem, ctx.params
        if "xyz" not in ctx.blocks or not (setup.model.kind == "water").any() or not waters_apply(ctx, params, told):
            return ctx
        from ..problem.problem import observed, observed_sigma_a
        from ..problem.xray_state import current_model_arrays, f_model_on_host
        from .density import maps_of_f_model

        # the atoms as they are now (the arrays bad_waters reads) and maps phased by the current F_calc with the
        # state's scales and σA: refitting them here cost more than the check (4iid: 2.3 s of 5 cycles)
        xyz, b_iso, occ = current_model_arrays(params_now, problem)
        model_now = setup.model.with_arrays(xyz_cart=xyz, b_iso=b_iso, occ=occ)
        # the check reads the 2mFo−DFc map alone: no difference map (5orl: 1.6 -> 1.2 s over 5 cycles)
        x = problem.xray
        maps = maps_of_f_model(setup.refl, observed(x, f_model_on_host(params_now, problem, ctx.state)),
                               observed_sigma_a(x, ctx.state.sigma_a), difference=False)
        bad = bad_waters(model_now, maps, params) & (occ > 0)
        if not bad.any():  # the same problem object: the state's refit reuses this F_calc (f_calc_of_jit)
            return ctx
        labels = []
        for i in np.nonzero(bad)[0]:
            m = setup.model
            label = f"{m.chain_id[i]}/{m.res_name[i]} {m.res_seq[i]}"
            log.info("removed water %s (B %.1f Å²; out of density, above waters.max_b or clashing)", label, model_now.b_iso[i])
            labels.append(label)
        occ0 = on_device(np.where(bad, 0.0, np.asarray(problem.maps.occ0)), problem.maps.occ0.dtype)
        return ctx._replace(problem=problem._replace(maps=problem.maps._replace(occ0=occ0)), removed=tuple(labels))

    return remove_bad


def pick_waters_hook(params: WaterConfig = WaterConfig(), remove: bool = True, told: list | None = None):
    """Action: water picking between coordinate macrocycles (not after the last): remove bad waters and add waters
    at mFo−DFc peaks.  New waters fill the setup's spare slots (:func:`jaxrefine.problem.setup.with_spare_waters`):
    the shapes stay and nothing compiles again.  Where the slots run out (or rigid bodies move the atoms) the
    problem is rebuilt for the new atoms (this recompiles the energy).  Nothing happens with data beyond
    ``params.max_d_min`` (see :func:`waters_apply`)."""
    told = [] if told is None else told

    def pick(ctx):
        if "xyz" not in ctx.blocks or ctx.last or not waters_apply(ctx, params, told):
            return ctx
        from ..problem.problem import observed, observed_sigma_a
        from ..problem.xray_state import f_model_on_host, model_of
        from .density import maps_of_f_model

        setup, problem = ctx.setup, ctx.problem
        model_all = model_of(setup.model, ctx.params, problem, setup.adp_choice)
        live = model_all.occ > 0
        model_now = model_all if live.all() else model_all.subset(live)
        # the maps of the refinement's F_model (scales and σA refitted at the end of the cycle): no F_calc of its own
        # for the live atoms (another shape each round: 0.5 s of compiling a round on 4xof)
        x = problem.xray
        maps = maps_of_f_model(setup.refl, observed(x, f_model_on_host(ctx.params, problem, ctx.state)),
                               observed_sigma_a(x, ctx.state.sigma_a))
        ch = water_changes(model_now, setup.refl, params, maps=maps, remove=remove)
        removed = np.zeros(model_all.n_atoms, bool)
        removed[np.nonzero(live)[0][ch.removed]] = True
        n_removed = int(np.unique(model_now.res_index[ch.removed]).size)
        spare = setup.spare_waters
        free = np.zeros(model_all.n_atoms, bool) if spare is None else spare & ~live
        if not len(ch.added) and not removed.any():
            log.info("waters: removed 0, added 0 (now %d)", int((model_now.kind == "water").sum()))
            return ctx
        if len(ch.added) <= free.sum() and ctx.params.rot.shape[0] == 0:
            n_now = int((model_now.kind == "water").sum()) - int(ch.removed.sum()) + len(ch.added)
            _water_report(n_removed, ch, n_now)
            return _fill_slots(ctx, removed, np.nonzero(free)[0][:len(ch.added)], ch)
        from ..io.residue_edit import add_waters
        from ..problem.setup import rebuild_setup

        model_new = model_now.subset(~ch.removed) if ch.removed.any() else model_now
        if len(ch.added):
            model_new = add_waters(model_new, ch.added, np.full(len(ch.added), ch.b_new))
        _water_report(n_removed, ch, int((model_new.kind == "water").sum()))
        log.info("waters: %d new, %d spare slots: the problem is rebuilt for the new atoms", len(ch.added), int(free.sum()))
        new = rebuild_setup(setup, model_new)
        return ctx._replace(setup=new, params=new.params, problem=new.problem, state=new.state._replace(w_a=ctx.state.w_a))

    return pick


def _fill_slots(ctx, removed, slots, ch: WaterChanges):
    """``ctx`` with the waters ``removed`` ((n,) bool) switched off and the new waters in the spare ``slots``: their
    positions, B and occupancy 1 in the parameters, the problem and the setup's model (which the solvent mask and
    the writers read); the X-ray state refitted for them.  A new setup object: the loop rebuilds the neighbour
    list and the mask, and compares R-free from here on."""
    from ..problem.params import b_to_raw
    from ..problem.xray_state import update_xray_state

    setup, problem, params = ctx.setup, ctx.problem, ctx.params
    model = setup.model
    occ0 = np.array(problem.maps.occ0)
    occ0[removed] = 0.0
    occ0[slots] = 1.0
    xyz_frac = np.array(params.xyz_frac)
    xyz_frac[slots] = model.crystal.to_frac(ch.added)
    b_raw = np.array(params.b_raw)
    b_raw[slots] = b_to_raw(np.full(len(slots), ch.b_new), float(problem.maps.b_min))
    xyz_cart, b_iso, occ = model.xyz_cart.copy(), model.b_iso.copy(), model.occ.copy()
    xyz_cart[slots], b_iso[slots], occ[slots] = ch.added, ch.b_new, 1.0
    setup = setup._replace(model=model.with_arrays(xyz_cart=xyz_cart, b_iso=b_iso, occ=occ))
    problem = problem._replace(maps=problem.maps._replace(occ0=on_device(occ0, problem.maps.occ0.dtype)))
    params = params._replace(xyz_frac=on_device(xyz_frac, params.xyz_frac.dtype), b_raw=on_device(b_raw, params.b_raw.dtype))
    state = update_xray_state(setup, problem, ctx.state, params)
    labels = tuple(f"{model.chain_id[i]}/{model.res_name[i]} {model.res_seq[i]}" for i in np.nonzero(removed)[0])
    return ctx._replace(setup=setup, params=params, problem=problem, state=state, removed=labels)
