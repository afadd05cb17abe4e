"""Automatic w_A: the low-resolution scan's choice and its log line (pure logic, no data)."""
from __future__ import annotations

import numpy as np

from jaxrefine.refine import weights as wmod
from jaxrefine.refine.weights import WeightTrial


def _trial(w, nll, bond, angle=1.5):
    return WeightTrial(w_a=w, free_nll=nll, r_free=0.3, rms_bond=bond, rms_angle=angle)


def test_scan_keeps_lowest_free_nll_among_trials_within_the_geometry_limits():
    trials = [_trial(0.05, 1010.0, 0.006), _trial(0.1, 1000.0, 0.010), _trial(0.2, 990.0, 0.020)]
    # the loosest trial has the best likelihood but bonds beyond 0.015 Å: not eligible
    assert wmod.choose_trial(trials) == 1
    trials[1] = _trial(0.1, 1000.0, 0.010, angle=2.4)  # angles beyond 2.0°
    assert wmod.choose_trial(trials) == 0
    line = wmod.describe_scan(trials, 0)
    assert "-> 0.05 (lowest free -log-likelihood)" in line and line.count("geometry beyond limits") == 2


def test_scan_without_eligible_trial_keeps_the_tightest_bonds():
    trials = [_trial(0.5, 900.0, 0.030), _trial(1.0, 950.0, 0.020), _trial(2.0, 980.0, 0.025)]
    k = wmod.choose_trial(trials)
    assert k == 1 and "tightest bonds" in wmod.describe_scan(trials, k)


def test_scan_applies_only_to_the_automatic_weight_at_low_resolution():
    assert wmod.scan_applies("auto", 3.0) and wmod.scan_applies("auto", wmod.SCAN_D_MIN)
    assert not wmod.scan_applies("auto", 1.5) and not wmod.scan_applies(0.5, 3.0)
    ws = wmod.scan_weights(0.1)
    assert np.allclose(ws, [0.1 * f for f in wmod.SCAN_FACTORS]) and 0.1 in ws
    assert min(wmod.scan_weights(wmod.W_A_LIMITS[0])) == wmod.W_A_LIMITS[0]  # clipped


def test_adjust_w_a_is_damped_and_bounded():
    target = 1.0
    assert wmod.adjust_w_a(0.1, 1.0, target) == 0.1  # inside the band: unchanged
    assert np.isclose(wmod.adjust_w_a(0.1, 2.0, target), 0.1 * np.sqrt(2.0))  # square root of the ratio
    assert np.isclose(wmod.adjust_w_a(0.1, 0.3, target), 0.1 / wmod.MAX_DECREASE)  # falls are smaller steps
    assert wmod.adjust_w_a(0.1, 0.62, target) == 0.1  # the cycle-1 RMS Z of 5e5z/1l2h: no fall
    assert np.isclose(wmod.adjust_w_a(0.1, 10.0, target), 0.1 * wmod.MAX_FACTOR)  # at most MAX_FACTOR per cycle
    # the geometry limits: angles beyond LIMIT_AIM x 2.0° raise w_A even with RMS Z(bond) inside the band
    aim = wmod.LIMIT_AIM * wmod.MAX_RMS_ANGLE
    assert np.isclose(wmod.adjust_w_a(0.1, 1.0, target, 0.010, 1.1 * aim), 0.1 * 1.1 ** wmod.LIMIT_POWER)
    assert wmod.adjust_w_a(0.1, 1.0, target, 0.010, 0.99 * aim) == 0.1
    assert wmod.adjust_w_a(0.1, 0.3, target, 0.010, 1.1 * aim) > 0.1  # the angles win over tight bonds
    assert np.isclose(wmod.adjust_w_a(0.1, 1.0, target, 1.2 * wmod.LIMIT_AIM * wmod.MAX_RMS_BOND, 1.0), 0.1 * 1.2 ** 2)


def test_scan_w_a_runs_every_trial_and_returns_the_kept_result():
    seen = []

    def run_trials(weights):  # a fake minimisation: the likelihood is best at w = 0.2, bonds loosen as w falls
        seen.extend(weights)
        return [(f"params@{w:g}", _trial(w, 10 * (np.log(w) - np.log(0.2)) ** 2, 0.001 / w)) for w in weights]

    result, trial, line = wmod.scan_w_a(0.1, run_trials)
    assert seen == wmod.scan_weights(0.1)
    assert result == "params@0.2" and trial.w_a == 0.2 and "-> 0.2 " in line


def test_trial_steps_split_the_cycle():
    """Each scan trial takes part of the cycle's coordinate steps and the kept trial the rest: the
    cycle's total is the configured number, and a trial always moves."""
    assert wmod.trial_steps(25) == (10, 15)
    for n in (1, 2, 7, 40):
        first, rest = wmod.trial_steps(n)
        assert first >= 1 and rest >= 0 and first + rest == n


def test_scan_settles_when_it_keeps_the_current_weight():
    kept = _trial(0.1, 10.0, 0.005)
    assert wmod.scan_settled(0.1, kept)
    assert not wmod.scan_settled(0.05, kept) and not wmod.scan_settled(0.2, kept)


def test_scan_keeps_the_current_weight_unless_a_trial_beats_it_by_more_than_the_margin():
    """Free-set -log-likelihood differences within SCAN_KEEP_MARGIN do not move w_A (and so the scan settles); a larger
    gain does; an ineligible current weight does not count."""
    m = wmod.SCAN_KEEP_MARGIN
    trials = [_trial(0.05, 1000.0, 0.006), _trial(0.1, 1000.0 - 0.9 * m, 0.005), _trial(0.2, 1000.0 - 0.9 * m - 0.8 * m, 0.004)]
    assert wmod.choose_trial(trials) == 2  # without the current weight: the lowest
    k = wmod.choose_trial(trials, 0.1)
    assert k == 1 and f"within {m:g} of the lowest" in wmod.describe_scan(trials, k)
    assert wmod.scan_settled(0.1, trials[k])
    trials[2] = _trial(0.2, 1000.0 - 0.9 * m - 1.1 * m, 0.004)
    assert wmod.choose_trial(trials, 0.1) == 2
    trials[1] = _trial(0.1, 1000.0 - 0.9 * m, 0.005, angle=2.5)  # beyond the limits: not kept for being current
    trials[2] = _trial(0.2, 1000.0 - 0.9 * m - 0.5 * m, 0.004)
    assert wmod.choose_trial(trials, 0.1) == 2 and "(lowest free" in wmod.describe_scan(trials, 2)
