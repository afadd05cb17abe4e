"""Automatic choice of w_A, the weight of E_geometry against E_xray.

Start: the balance of gradient norms (Brünger, Karplus & Petsko 1989; Adams et al. 1997,
phenix/CNS "wa"): w_A = ‖∇E_xray‖ / ‖∇E_geometry‖, where the geometry gradient norm is the one
expected for a model whose restraint Z-scores are at the target RMS Z (so the start does not
depend on how distorted the input model is).  Then, every macrocycle, w_A moves toward the
target RMS Z of bond lengths (as REFMAC/servalcat's weight adjustment does): up when the bonds
are looser than the target range, down when tighter.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

RMSZ_BAND = (0.6, 1.25)  # acceptable RMS Z(bond) as factors of the target (servalcat keeps 0.5–1.0); the
# low end is wide because lowering w_A loosens bonds sharply (5e5z, 1l2h: w_A × 0.8 after cycle 1 took
# RMS Z from 0.62 to 1.4-1.5 and R-free rose for the rest of the run)
MAX_DECREASE = 1.25  # largest fall of w_A per macrocycle (rises may be MAX_FACTOR)
MAX_FACTOR = 1.6  # largest change of w_A per macrocycle (larger steps make w_A oscillate)
# RMS Z(bond) responds to w_A much faster than linearly (1l2h shaken start: w_A × 0.63 took RMS Z
# from 0.62 to 1.76, bonds 0.008 -> 0.022 Å, and R-free rose for three cycles), so the step is the
# square root of the ratio to the target
ADJUST_POWER = 0.5
W_A_LIMITS = (1e-4, 1e3)


def expected_geometry_grad_norm(restraints, n_atoms: int, rmsz: float) -> float:
    """‖∇E_geometry‖ (per Å) of a model whose bond and angle Z-scores are all ``rmsz``.

    For a term (d − d0)²/σ², |∂E/∂x| = 2|z|/σ on each of its atoms (bonds; angles similarly with
    the lever arm ~1.5 Å).  Summing the squares over restraints gives the expected norm.
    """
    tot = 0.0
    b = restraints.bond
    tot += float(np.sum(np.asarray(b.mask) * 2 * (2 * rmsz / np.asarray(b.sigma)) ** 2))
    a = restraints.angle
    lever = 1.5  # Å: bond length, converts an angle force into a positional one
    tot += float(np.sum(np.asarray(a.mask) * 3 * (2 * rmsz / (np.asarray(a.sigma) * lever)) ** 2))
    return float(np.sqrt(max(tot, 1e-12)))


def initial_w_a(grad_xray_norm: float, restraints, n_atoms: int, target_rmsz: float) -> float:
    w = grad_xray_norm / expected_geometry_grad_norm(restraints, n_atoms, target_rmsz)
    return float(np.clip(w, *W_A_LIMITS))


def target_rmsz_for(d_min: float, target="auto") -> float:
    """Target RMS Z(bond): looser at high resolution, where the data define bonds well, tighter at
    low resolution (1.0 at d <= 1.5 Å falling linearly to 0.45 at 3.3 Å; a number overrides)."""
    if target != "auto":
        return float(target)
    return float(np.clip(1.0 - 0.3 * (d_min - 1.5), 0.45, 1.0))


# Geometry limits the steering also holds (issue 14's RMS bond 0.015 Å and RMS angle 2.0°): at high
# resolution RMS Z(bond) 1.0 can leave angles at 2.3-3.0° (4xof, 4iid, 1l2h), so w_A also rises when
# either RMS deviation is beyond LIMIT_AIM of its limit, by (RMS / aim)^LIMIT_POWER, whatever the bonds'
# RMS Z says (aiming at the limit itself left 4xof, 1l2h, 5orl, 4iid at 2.06-2.08° after 5 cycles, 0.95 of
# it 1l2h at 2.004°; 0.9: 1.87-1.95° with R-free within ±0.0004 of 0.95's on all four, but float-level changes
# elsewhere later put 4xof at 2.01° and 1l2h at 1.99°: the last cycle's angles are not steered again.  0.85:
# 4xof 1.84° (R-free 0.1769 -> 0.1785), 1l2h 1.96° (0.2639, the same), 5orl 1.86° (0.2165 -> 0.2168), 4iid
# 1.74° (0.1966, the same); 0.875 left 4xof at 1.97°.  5e5z, 1va7 and 5kzb unchanged).
MAX_RMS_BOND = 0.015  # Å
MAX_RMS_ANGLE = 2.0  # degrees
LIMIT_AIM = 0.85
LIMIT_POWER = 2.0


def adjust_w_a(w_a: float, rmsz_bond: float, target_rmsz: float, rms_bond: float = 0.0,
               rms_angle: float = 0.0) -> float:
    """New w_A after a macrocycle that ended with RMS Z(bond) = ``rmsz_bond`` (and RMS deviations
    ``rms_bond`` Å, ``rms_angle`` degrees: w_A rises when either is beyond its limit)."""
    lo, hi = RMSZ_BAND[0] * target_rmsz, RMSZ_BAND[1] * target_rmsz
    factor = 1.0
    if np.isfinite(rmsz_bond) and not lo <= rmsz_bond <= hi:
        factor = (rmsz_bond / target_rmsz) ** ADJUST_POWER
    over = max(rms_bond / MAX_RMS_BOND, rms_angle / MAX_RMS_ANGLE) / LIMIT_AIM
    if np.isfinite(over) and over > 1.0:
        factor = max(factor, over ** LIMIT_POWER)
    if factor == 1.0:
        return w_a
    factor = float(np.clip(factor, 1 / MAX_DECREASE, MAX_FACTOR))
    return float(np.clip(w_a * factor, *W_A_LIMITS))


# ------------------------------------------------------------------ w_A scan (low resolution)
# At low resolution the target RMS Z is a poor guide (the data say little about bond lengths), so
# the weight is chosen from the data instead, as phenix's weight optimisation does (Afonine et al.
# 2011, Acta Cryst. D67, 296): each macrocycle a few trial weights around the current one are each
# given the same coordinate steps from the same start, and the trial whose model has the lowest
# free-set −log-likelihood (with the cycle's scales and σA) is kept and given the rest of the cycle's
# steps; trials whose geometry is beyond the limits below are not eligible.  w_A is a traced array, so the trials share one
# compiled minimiser.
SCAN_D_MIN = 2.5  # Å: scan w_A when the data stop at d_min >= this (the target RMS Z is used above)
SCAN_FACTORS = (0.5, 1.0, 2.0)  # trial weights as multiples of the current w_A
SCAN_TRIAL_FRACTION = 0.4  # each trial takes this fraction of the cycle's coordinate steps; the kept one then
# takes the rest (3 trials of 10 + 15 steps instead of 3 x 25: 5kzb, 1va7 same R-free, 1/3 fewer F evaluations)
# Once a scan keeps the current weight, w_A has settled: later macrocycles keep it and take the plain
# coordinate steps (1va7: scans after the one that kept the weight moved it by one factor and back, with
# free-set -LL differences below 1 and R-free within noise, at 20 of each cycle's ~60 steps): scan_settled.
# The current weight stays unless an eligible trial beats its free-set -log-likelihood by more than this (a likelihood
# ratio of e, below any significance for one parameter): 5kzb's scans moved w_A by a factor 2 and back every cycle on
# differences of 0.1-0.6 and never settled (seed 7: 342 F evaluations, R-free 0.2526; with the margin it settles in
# cycle 2: 257, 0.2524; over five shaken starts of 5kzb the mean R-free 0.2552 -> 0.2554, 1630 -> 1522 evaluations,
# three starts unchanged; 1va7's five unchanged: their scans settle without it).
SCAN_KEEP_MARGIN = 1.0
SCAN_MAX_RMS_BOND = MAX_RMS_BOND  # Å: trials with looser geometry are not eligible (issue 14's limits)
SCAN_MAX_RMS_ANGLE = MAX_RMS_ANGLE  # degrees


class WeightTrial(NamedTuple):
    """One trial weight of a scan and what its model scored."""

    w_a: float
    free_nll: float  # free-set −log-likelihood (lower is better)
    r_free: float
    rms_bond: float  # Å
    rms_angle: float  # degrees

    @property
    def eligible(self) -> bool:
        return self.rms_bond <= SCAN_MAX_RMS_BOND and self.rms_angle <= SCAN_MAX_RMS_ANGLE


def scan_applies(w_a_setting, d_min: float) -> bool:
    """Whether w_A is chosen by a scan: automatic weight and data that stop at d_min >= SCAN_D_MIN."""
    return w_a_setting == "auto" and d_min >= SCAN_D_MIN


def trial_steps(n_steps: int) -> tuple:
    """(steps of each trial, steps the kept trial takes after the scan) out of a cycle's ``n_steps``."""
    first = max(1, min(n_steps, int(round(SCAN_TRIAL_FRACTION * n_steps))))
    return first, n_steps - first


def scan_weights(w_a: float, factors=SCAN_FACTORS) -> list:
    """Trial weights around ``w_a`` (clipped to W_A_LIMITS)."""
    return [float(np.clip(w_a * f, *W_A_LIMITS)) for f in factors]


def choose_trial(trials, w_a: float | None = None, margin: float = SCAN_KEEP_MARGIN) -> int:
    """Index of the kept trial: the lowest free −log-likelihood among the eligible trials, else
    (none eligible) the trial with the tightest bonds.  The trial of the current weight ``w_a`` (None: none) is
    kept while it is eligible and no eligible trial beats it by more than ``margin``."""
    ok = [k for k, t in enumerate(trials) if t.eligible]
    if not ok:
        return int(np.argmin([t.rms_bond for t in trials]))
    best = min(ok, key=lambda k: trials[k].free_nll)
    now = [k for k in ok if w_a is not None and np.isclose(trials[k].w_a, w_a, rtol=1e-6)]
    if now and trials[now[0]].free_nll <= trials[best].free_nll + margin:
        return now[0]
    return best


def scan_settled(w_a: float, kept: WeightTrial) -> bool:
    """Whether a scan around ``w_a`` kept ``w_a`` itself (w_A has settled: later cycles need no scan)."""
    return bool(np.isclose(kept.w_a, w_a, rtol=1e-6))


def describe_scan(trials, chosen: int) -> str:
    """One log line: every trial and why the chosen one was kept."""
    parts = [f"{t.w_a:.3g}: -LLfree {t.free_nll:.1f} Rfree {t.r_free:.4f} bond {t.rms_bond:.4f} angle {t.rms_angle:.2f}"
             + ("" if t.eligible else " (geometry beyond limits)") for t in trials]
    lowest = min((t.free_nll for t in trials if t.eligible), default=None)
    why = ("no trial within the geometry limits: tightest bonds" if not trials[chosen].eligible
           else "lowest free -log-likelihood" if trials[chosen].free_nll <= lowest
           else f"the current weight: free -log-likelihood within {SCAN_KEEP_MARGIN:g} of the lowest")
    return f"w_A scan [{'; '.join(parts)}] -> {trials[chosen].w_a:.3g} ({why})"


def scan_w_a(w_a: float, run_trials, factors=SCAN_FACTORS):
    """Run the trials of a scan around ``w_a`` and keep one.

    Args:
        w_a: the current weight.
        run_trials: ``run_trials(weights) -> [(result, WeightTrial), ...]``: minimise from the same start
            with each weight and score the models (a result is whatever the caller keeps, e.g. params).

    Returns:
        (result of the kept trial, its WeightTrial, one log line saying why).
    """
    outs = run_trials(scan_weights(w_a, factors))
    trials = [t for _, t in outs]
    k = choose_trial(trials, w_a)
    return outs[k][0], trials[k], describe_scan(trials, k)
