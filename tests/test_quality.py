"""Refinement behaviour at low and at high resolution from the shaken start (issue 14).

One shared dataset each, few macrocycles (CI time); the peer's number (servalcat 0.4.142, 10 cycles
from the same shaken start, shared data README) is written beside each threshold.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

from jaxrefine.config import load_config
from jaxrefine.io.build import with_coordinates
from jaxrefine.io.model import read_model
from jaxrefine.io.perturb import shake
from jaxrefine.io.reflections import read_reflections
from jaxrefine.problem import build_setup
from jaxrefine.problem.params import atom_occ
from jaxrefine.refine.engine import refine

from conftest import dataset_paths, monomer_dir

CYCLES = 4
STEPS = ("refine.steps_xyz=15", "refine.steps_b=8")  # fewer steps than the defaults (25 + 15): CI time
MAX_RMS_BOND = 0.015  # Å, issue 14's limit (servalcat from the shaken start: 5kzb 0.016, 5e5z 0.014)
MAX_RMS_ANGLE = 2.0  # degrees, issue 14's limit (servalcat: 5kzb 4.0, 5e5z 2.1)
R_FREE_RISE = 0.005  # after cycle 2, R-free may exceed its best so far by at most this (231 free reflections at 5kzb)
# R-free thresholds: servalcat's 10 cycles, plus what 4 short cycles leave (measured 2026-11-30)
LOW_RES_R_FREE = 0.258 + 0.025  # 5kzb, 3.2 Å: servalcat 0.258; jaxrefine 5 full cycles 0.267
# 4xof, 1.15 Å, with riding hydrogens (model.hydrogens: auto): servalcat 0.211, TorchRef 0.209 (the best peer);
# jaxrefine 0.183 in these 4 short cycles (2026-12-02; without hydrogens its 5 full cycles reached 0.198)
HIGH_RES_R_FREE = 0.209


def _shaken_refinement(pid, caplog, n_cycles=CYCLES, start=lambda m: m):
    m, d = dataset_paths(pid)
    model, refl = read_model(m, hydrogens=False), read_reflections(d)
    cfg = load_config(None, [f"model.monlib={monomer_dir()}", f"refine.n_cycles={n_cycles}", *STEPS])
    with caplog.at_level(logging.INFO, logger="jaxrefine"):
        res = refine(build_setup(None, None, cfg, model=start(shake(model, 0.5, seed=7)), refl=refl))
    return res, [r.getMessage() for r in caplog.records]


def _levels_off(history):
    best_early = min(h.r_free for h in history[1:3])
    return all(h.r_free <= best_early + R_FREE_RISE for h in history[3:])


@pytest.mark.slow
def test_low_resolution_weight_from_the_data_and_r_free_levels_off(caplog):
    res, lines = _shaken_refinement("5kzb", caplog)
    scans = [s for s in lines if s.startswith("w_A scan")]
    # the weight was chosen from the data, logged with why, every macrocycle until a scan kept it
    settled = [k for k, s in enumerate(scans) if s.endswith("w_A settled: later cycles keep it without a scan")]
    assert any(s.startswith("minimiser: 15 coordinate steps, then 8 B steps") for s in lines)  # 3.2 Å: one after the other
    assert scans and (settled == [len(scans) - 1] if settled else len(scans) == CYCLES), scans
    final = res.history[res.best_cycle]
    assert final.rms_bond <= MAX_RMS_BOND and final.rms_angle <= MAX_RMS_ANGLE, res.history
    assert final.r_free <= LOW_RES_R_FREE, res.history
    assert _levels_off(res.history), res.history


@pytest.mark.slow
def test_high_resolution_target_weight_and_r_free(caplog):
    """4xof (1.15 Å, 1112 free reflections) with the defaults: riding hydrogens, the weight steered to the
    target RMS Z.  (5e5z served here before; its 18 free reflections give R-free a standard error of ~0.05.)"""
    res, lines = _shaken_refinement("4xof", caplog)
    assert not any(s.startswith("w_A scan") for s in lines)  # 1.15 Å: steered to the target RMS Z instead
    assert any(s.startswith("hydrogens: riding (auto") for s in lines), [s for s in lines if "hydrogens" in s]
    # coordinates and B in one minimisation at 1.15 Å (refine.joint_xyz_b auto), with the occupancies of the
    # alternate conformations (refine.strategy auto)
    assert any(s.startswith("minimiser: coordinates, B and occupancies together") for s in lines), [s for s in lines if "minimiser" in s]
    final = res.history[res.best_cycle]
    assert final.r_free <= HIGH_RES_R_FREE, res.history
    # bonds within issue 14's limit at every cycle after the first (w_A also steers to the RMS limits;
    # servalcat 0.013 Å).  Angles lag in these short cycles; the default cycles' angles are checked in
    # tests/test_refine.py.
    for h in res.history[2:] + [final]:
        assert h.rms_bond <= MAX_RMS_BOND, res.history
    assert _levels_off(res.history), res.history


@pytest.mark.slow
def test_high_resolution_occupancies_of_alternate_conformers(caplog):
    """4xof's 178 atoms in alternate conformations, their occupancies reset to 0.5 (as after building the
    conformers by hand): the default strategy (auto) refines them with the coordinates and B and recovers the
    deposited split (5 full cycles: correlation 0.87, mean |occupancy − deposited| 0.118 -> 0.054; with the
    occupancies held, R-free 0.1809 against 0.1783 refined)."""
    deposited = read_model(dataset_paths("4xof")[0], hydrogens=False)
    alt = deposited.altloc != ""
    half = lambda m: with_coordinates(m, occ=np.where(alt, 0.5, m.occ))  # noqa: E731
    res, lines = _shaken_refinement("4xof", caplog, n_cycles=2, start=half)
    assert any(s.startswith("strategy: xyz_b_occ (auto: d_min 1.15 Å < 2.5 Å") for s in lines), lines[:12]
    assert any(s.startswith("minimiser: coordinates, B and occupancies together") for s in lines)
    occ = np.asarray(atom_occ(res.params, res.problem.maps))[alt]
    want = deposited.occ[alt]
    assert np.corrcoef(occ, want)[0, 1] > 0.6
    assert np.mean(np.abs(occ - want)) < 0.7 * np.mean(np.abs(0.5 - want))
