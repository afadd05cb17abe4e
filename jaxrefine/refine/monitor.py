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
from ..problem.problem import Problem, XrayState, observed
from ..problem.xray_state import current_model_arrays, f_model_on_host
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
                     f_model=None, since=None, arrays=None) -> CycleStats:
    """R-factors with the state's mask and scales, RMS deviations of the covalent geometry, and the
    time since ``t0`` (``time.perf_counter()``).  ``f_model``: the parameters' F_model with the state where
    the caller has it (computed here when None).  ``since``: (xyz (n, 3) Å, B (n,) Å²) of the previous cycle's
    model, for the RMS shifts (same atoms; None or other atoms: shifts 0).  ``arrays``: (xyz, B) of the parameters
    where the caller has them (:func:`current_model_arrays`; computed here when None)."""
    with timing.section("r_factors"):
        fm = f_model_on_host(params, problem, state) if f_model is None else f_model
        x = problem.xray
        r = r_factors(*observed(x, x.f_obs, fm, x.free))
    xyz, b = current_model_arrays(params, problem)[:2] if arrays is None else arrays
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


# Stopping the macrocycles on convergence (refine.converge_shift): from the third coordinate cycle on, once a cycle
# moved the atoms by less than converge_shift RMS (Å) and their B by less than B_SHIFT_PER_XYZ times that (Å²),
# and the automatic weight has stopped moving (the steering changed w_A by at most W_A_SETTLED of itself).  Measured
# on the seven shared datasets from shaken starts (benchmarks/README.md, run u): cycle 5 moves the atoms 0.004-0.07 Å
# and w_A still rises at high resolution, so the default 5 cycles all run.  Asked for 10 cycles, 4iid stops after
# cycle 6 (R-free 0.1964; all 10: 0.1959; 93 F evaluations instead of 122) and 4xof after cycle 7 (0.1765).  With
# W_A_SETTLED 0.05 4iid ran all 10: the steering kept raising w_A by 7 % a cycle.
MIN_CYCLES_BEFORE_STOP = 3
B_SHIFT_PER_XYZ = 20.0  # Å² of RMS B shift per Å of the coordinate limit (0.1 Å² at the default 0.005 Å)
W_A_SETTLED = 0.1


def weight_settled(w_a: float, w_a_next: float) -> bool:
    """Whether the automatic weight has stopped moving: the next cycle's ``w_a_next`` within W_A_SETTLED of ``w_a``."""
    return abs(w_a_next - w_a) <= W_A_SETTLED * abs(w_a)


def converged(st: CycleStats, n_xyz_cycles: int, w_a_next: float, shift_limit: float) -> bool:
    """Whether the macrocycles may stop after the cycle of ``st`` (see the note above): ``n_xyz_cycles`` coordinate
    cycles run so far, ``w_a_next`` the weight the next cycle would use, ``shift_limit`` refine.converge_shift (Å;
    0: never)."""
    if shift_limit <= 0 or n_xyz_cycles < MIN_CYCLES_BEFORE_STOP:
        return False
    return bool(st.shift_xyz < shift_limit and st.shift_b < B_SHIFT_PER_XYZ * shift_limit
                and weight_settled(st.w_a, w_a_next))


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
