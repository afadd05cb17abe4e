"""Everything a refinement writes into its output folder, each file atomically.

refined.cif, refined.pdb  model with R-work/R-free, resolution, RMS deviations and program in the header
maps.mtz                  FP SIGFP FREE, FMODEL/PHIFMODEL, 2FOFCWT/PH2FOFCWT, FOFCWT/PHFOFCWT
metrics.json              r_work r_free rms_bond rms_angle w_a k_sol b_sol wall_s + cycles (cycle 0 = input)
config.yaml               the resolved configuration (rerun with --config DIR/config.yaml)
run.json                  versions, git commit, command line, inputs
"""
from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys

import numpy as np

from .. import __version__
from ..config import dump_config
from ..io.writers import write_json, write_model, write_mtz, write_text
from ..xray.maps import map_coefficients
from ..problem.adp_model import adp_ncs_statistics, statistics_lines
from ..problem.problem import observed, observed_sigma_a
from ..problem.xray_state import current_model_arrays, current_u_aniso, f_model_on_host, written_adps
from .engine import RefinementResult

log = logging.getLogger("jaxrefine")


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # git missing or not a checkout
        return None


def metrics(result: RefinementResult) -> dict:
    """The metrics.json content: final (kept) model and one entry per cycle."""
    kept = result.history[result.best_cycle]
    out = {k: kept.as_dict()[k] for k in ("r_work", "r_free", "rms_bond", "rms_angle", "w_a", "k_sol", "b_sol")}
    out["wall_s"] = float(result.wall_s)
    out["best_cycle"] = int(result.best_cycle)
    # the cycle after which the macrocycles stopped on convergence (refine.converge_shift); null: all ran
    out["converged_after"] = result.converged_after
    # the cycle after which they stopped because R-free kept rising (guard.stop_after_rises); null: did not
    out["stopped_after"] = result.stopped_after
    refined = [st.r_free for st in result.history[1:]]
    out["r_free_refined"] = float(min(refined)) if refined else None  # the best refined cycle's, kept or not
    out["cycles"] = [dict(st.as_dict()) for st in result.history]
    out["warnings"] = list(result.warnings)
    out["removed_waters"] = list(result.removed_waters)
    return out


def model_updates(params, problem, setup, keep) -> dict:
    """The arrays the writers put into the refined model (atoms ``keep`` only): coordinates, B
    (B_eq of the total U for anisotropic and TLS atoms), occupancies, ANISOU and TLS groups
    (:func:`jaxrefine.problem.xray_state.written_adps`)."""
    xyz, b, occ = current_model_arrays(params, problem)
    out = dict(xyz_cart=xyz[keep], b_iso=b[keep], occ=occ[keep])
    adps = written_adps(setup.model, params, problem, setup.adp_choice)
    if adps["u_aniso"] is not None:
        out["u_aniso"] = adps["u_aniso"][keep]
    if adps["tls"] is not None:
        out["tls"] = adps["tls"]._replace(group=adps["tls"].group[keep])
    return out


def with_riding_hydrogens(model, updates: dict, setup):
    """(model, updates) with the library's hydrogens placed on the refined atoms, for the writers.

    The hydrogens are those the refinement rode (gemmi's placement on the final coordinates: where the
    last refresh of the riding frames put them), with the parent's B (× H_B_FACTOR) and occupancy, no
    ANISOU, and the parent's TLS group."""
    from ..io.hydrogens import riding_sites
    from ..io.model import model_from_structure
    from ..problem.riding import H_B_FACTOR

    cfg = setup.config
    sites = riding_sites(model, setup.monlib, cfg.model.ligands, xyz_cart=updates["xyz_cart"])
    full = model_from_structure(sites.structure, source=model.source, hydrogens=True)
    is_h = np.asarray(full.is_hydrogen, bool)
    heavy = np.flatnonzero(~is_h)  # heavy atoms keep their order
    # each riding hydrogen's row (model order = the structure's order); serials are unique among the hydrogens only
    row_of = {cra.atom.serial: i for i, cra in enumerate(sites.structure[0].all()) if cra.atom.is_hydrogen()}
    rows = np.array([row_of[int(k)] for k in sites.h_serial], int)
    parent = np.full(full.n_atoms, -1)
    parent[heavy] = np.arange(len(heavy))
    parent[rows] = np.asarray(sites.parent)
    keep = ~is_h
    keep[rows] = True  # hydrogens without a frame (not ridden) are left out
    out = {"xyz_cart": np.asarray(full.xyz_cart, float).copy()}
    out["xyz_cart"][heavy] = np.asarray(updates["xyz_cart"], float)
    out["b_iso"] = np.asarray(updates["b_iso"], float)[parent] * np.where(is_h, H_B_FACTOR, 1.0)
    out["occ"] = np.asarray(updates["occ"], float)[parent]
    if updates.get("u_aniso") is not None:
        out["u_aniso"] = np.where(is_h[:, None], 0.0, np.asarray(updates["u_aniso"], float)[parent])
    if updates.get("tls") is not None:
        out["tls"] = updates["tls"]._replace(group=np.asarray(updates["tls"].group)[parent][keep])
    out = {k: (v[keep] if k != "tls" else v) for k, v in out.items()}
    out["remarks"] = updates.get("remarks")
    return full.subset(keep), out


def write_outputs(result: RefinementResult, setup, out_dir, argv=None) -> dict:
    """Write the refined model, maps, metrics, config and run record into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    setup = result.setup or setup
    model, refl, cfg = setup.model, setup.refl, setup.config
    params, problem = result.params, result.problem
    m = metrics(result)
    remarks = {"r_work": m["r_work"], "r_free": m["r_free"], "d_min": refl.d_min, "d_max": refl.d_max,
               "rms_bond": m["rms_bond"], "rms_angle": m["rms_angle"], "version": __version__}
    keep = ~np.asarray(result.removed_atoms, bool)
    out_model = model.subset(keep) if not keep.all() else model
    updates = dict(model_updates(params, problem, setup, keep), remarks=remarks)
    if setup.adp_choice is not None:
        m["adp_model"] = {"mode": setup.adp_choice.mode, "reason": setup.adp_choice.reason}
    if setup.strategy[0]:
        m["strategy"] = {"mode": setup.strategy[0], "reason": setup.strategy[1]}
    riding = getattr(problem, "riding", None)
    m["hydrogens"] = {"mode": setup.hydrogens[0], "reason": setup.hydrogens[1],
                      "n_riding": 0 if riding is None else int(riding.parent.shape[0])}
    stats = adp_ncs_statistics(current_model_arrays(params, problem)[0], current_u_aniso(params, problem),
                               problem.adp, problem.ncs, setup.ncs_copies)
    m.update(stats)
    for line in statistics_lines(stats):
        log.info(line)
    if cfg.output.hydrogens == "write" and riding is not None:
        out_model, updates = with_riding_hydrogens(out_model, updates, setup)
        log.info("riding hydrogens written: %d", int(np.sum(out_model.is_hydrogen)))
    write_model(out_model, os.path.join(out_dir, "refined.cif"), **updates)
    if cfg.output.write_pdb:
        write_model(out_model, os.path.join(out_dir, "refined.pdb"), **updates)
    x = problem.xray
    fo, fm, centric, epsilon = observed(x, x.f_obs, f_model_on_host(params, problem, result.state), x.centric, x.epsilon)
    two, one = map_coefficients(fo, fm, observed_sigma_a(x, result.state.sigma_a), centric, epsilon)
    write_mtz(os.path.join(out_dir, "maps.mtz"), refl.crystal, refl.hkl, {
        "FP": ("F", refl.f_obs), "SIGFP": ("Q", refl.sig_f_obs), "FREE": ("I", np.where(refl.free, 0, 1)),
        "FMODEL/PHIFMODEL": ("FP", fm), "2FOFCWT/PH2FOFCWT": ("FP", np.asarray(two)), "FOFCWT/PHFOFCWT": ("FP", np.asarray(one)),
    })
    write_json(os.path.join(out_dir, "metrics.json"), m)
    write_text(os.path.join(out_dir, "config.yaml"), dump_config(cfg))
    from importlib.metadata import version

    import jax

    write_json(os.path.join(out_dir, "run.json"), {
        "jaxrefine": __version__, "git_commit": git_commit(), "python": sys.version.split()[0],
        "jax": jax.__version__, "optax": version("optax"), "gemmi": version("gemmi"), "numpy": np.__version__,
        "platform": platform.platform(), "device": str(jax.devices()[0]), "argv": list(argv or sys.argv),
        "model": model.source, "data": refl.source, "monlib": setup.monlib,
    })
    return m
