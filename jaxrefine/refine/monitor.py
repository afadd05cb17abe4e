"""What is reported per macrocycle: R-work, R-free, geometry, w_A, bulk solvent and time.

One line per macrocycle is logged at INFO (:data:`HEADER`, :func:`format_cycle`); the same numbers
go to metrics.json (:meth:`CycleStats.as_dict`).
"""
from __future__ import annotations

import logging
import time
from typing import NamedTuple

import numpy as np

from ..core import timing
from ..problem.params import Params
from ..problem.problem import Problem, XrayState
from ..problem.xray_state import current_model_arrays, f_model_of_jit
from ..restraints import geometry_report
from ..xray.stats import r_factors

log = logging.getLogger("jaxrefine")


class CycleStats(NamedTuple):
    """Statistics of one macrocycle (cycle 0 = the input model)."""

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
    shift_xyz: float = 0.0  # RMS coordinate shift since the previous cycle (Å; 0 for the input model)
    shift_b: float = 0.0  # RMS B_eq shift since the previous cycle (Å²)

    def as_dict(self):
        return {k: (float(v) if k != "cycle" else int(v)) for k, v in self._asdict().items()}


def cycle_statistics(cycle: int, params: Params, problem: Problem, state: XrayState, t0: float,
                     f_model=None, since=None) -> CycleStats:
    """R-factors with the state's mask and scales, RMS deviations of the covalent geometry, and the
    time since ``t0`` (``time.perf_counter()``).  ``f_model``: the parameters' F_model with the state where
    the caller has it (computed here when None).  ``since``: (xyz (n, 3) Å, B (n,) Å²) of the previous cycle's
    model, for the RMS shifts (same atoms; None or other atoms: shifts 0)."""
    with timing.section("r_factors"):
        fm = np.asarray(f_model_of_jit(params, problem, state) if f_model is None else f_model)
        x = problem.xray
        r = r_factors(np.asarray(x.f_obs), fm, np.asarray(x.free))
    xyz, b, _ = current_model_arrays(params, problem)
    d_xyz, d_b = rms_shifts(xyz, b, since)
    with timing.section("geometry"):
        geo = geometry_report(xyz, problem.restraints, None)
    sc = state.scales
    return CycleStats(
        cycle=cycle, r_work=float(r["r_work"]), r_free=float(r["r_free"]), rms_bond=float(geo.rms_bond),
        rms_angle=float(geo.rms_angle), rmsz_bond=float(geo.rms_z_bond), w_a=float(state.w_a),
        k_sol=float(sc.k_sol), b_sol=float(sc.b_sol), time_s=time.perf_counter() - t0, shift_xyz=d_xyz, shift_b=d_b,
    )


def rms_shifts(xyz, b, since) -> tuple:
    """(RMS coordinate shift Å, RMS B shift Å²) of the atoms from ``since`` = (xyz, B) of the same atoms
    (zeros when ``since`` is None or holds other atoms).  Every atom counts, waters switched off (occupancy 0)
    included; B is B_eq where the ADP model is anisotropic or TLS."""
    if since is None or np.shape(since[0]) != np.shape(xyz) or len(xyz) == 0:
        return 0.0, 0.0
    d_xyz = float(np.sqrt(np.mean(np.sum((np.asarray(xyz) - since[0]) ** 2, axis=1))))
    d_b = float(np.sqrt(np.mean((np.asarray(b) - since[1]) ** 2)))
    return d_xyz, d_b


HEADER = "cycle  R-work  R-free  rms_bond  rms_angle  rmsZ_bond     w_A   k_sol   B_sol  shift_xyz  shift_B   time_s"


def format_cycle(st: CycleStats) -> str:
    return (f"{st.cycle:5d}  {st.r_work:.4f}  {st.r_free:.4f}  {st.rms_bond:8.4f}  {st.rms_angle:9.3f}  {st.rmsz_bond:9.3f}"
            f"  {st.w_a:6.3g}  {st.k_sol:6.3f}  {st.b_sol:6.1f}  {st.shift_xyz:9.3f}  {st.shift_b:7.2f}  {st.time_s:7.1f}")


def log_cycle(st: CycleStats, callback=None):
    """Log the cycle's line (with the header before cycle 0) and pass the stats to ``callback``."""
    if st.cycle == 0:
        log.info(HEADER)
    log.info(format_cycle(st))
    if callback is not None:
        callback(st)
