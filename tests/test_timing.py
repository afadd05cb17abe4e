"""The timing record (core/timing.py) and the optimiser's step/evaluation counts (refine/optimize.py)."""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrefine.core import timing
from jaxrefine.refine.optimize import minimise, minimise_with_stats


def test_sections_go_to_the_run_and_to_cycles():
    clock = iter([{"trace_s": 0.0, "lower_s": 0.0, "compile_s": 0.0, "cache_hits": 0, "cache_misses": 0},
                  {"trace_s": 0.5, "lower_s": 0.25, "compile_s": 1.0, "cache_hits": 0, "cache_misses": 2}] + [
                  {"trace_s": 1.0, "lower_s": 0.5, "compile_s": 2.0, "cache_hits": 1, "cache_misses": 3}] * 10)
    with timing.section("read"):  # no recorder open: a no-op
        pass
    with timing.recording(compile_clock=lambda: next(clock)) as rec:
        with timing.section("read"):
            time.sleep(0.02)
        timing.begin_cycle(1)
        with timing.section("optimise"):
            time.sleep(0.01)
        with timing.section("mask"):
            pass
        timing.count("evaluations", 7)
        timing.count("evaluations", 5)
        rec.end_cycles()
        with timing.section("write"):
            pass
    d = rec.as_dict()
    assert timing.current() is None
    assert d["read_s"] >= 0.02 and "write_s" in d
    (c,) = d["cycles"]
    assert c["cycle"] == 1 and c["evaluations"] == 12 and c["optimise_s"] >= 0.01
    assert set(c["host_s"]) == {"mask"}
    assert c["wall_s"] >= c["optimise_s"]
    assert c["compile_s"] == pytest.approx(1.75)  # trace + lower + compile between the cycle's two clock readings
    assert d["compile"]["cache_misses"] == 3 and d["compile_s"] == pytest.approx(3.5)
    assert any("12 F evaluations" in line for line in rec.summary_lines())


def test_process_age_is_positive():
    assert 0.0 < timing.process_age_s() < 1e6


def _quadratic(x, scale):
    return jnp.sum(scale * (x - 1.0) ** 2) + 100.0  # a non-zero minimum, as a refinement target has


def test_convergence_test_never_stops_before_min_steps():
    """optimize.MIN_STEPS: with a tolerance so loose that any step passes it, L-BFGS (and Adam) still take
    MIN_STEPS steps, and then stop."""
    from jaxrefine.refine.optimize import MIN_STEPS

    scale = jnp.asarray(np.logspace(0, 3, 20))
    for method in ("lbfgs", "adam"):
        _, _, stats = minimise_with_stats(_quadratic, jnp.zeros(20), (scale,), 50, method=method, rtol=1.0)
        assert int(stats.steps) == MIN_STEPS, method


def test_minimise_counts_and_stops_on_convergence():
    """An ill-conditioned quadratic: L-BFGS converges long before 200 steps when rtol is set."""
    scale = jnp.asarray(np.logspace(0, 3, 20))
    x0 = jnp.zeros(20)
    x_fixed, v_fixed, s_fixed = minimise_with_stats(_quadratic, x0, (scale,), 200, rtol=0.0)
    x_conv, v_conv, s_conv = minimise_with_stats(_quadratic, x0, (scale,), 200, rtol=1e-6)
    assert int(s_fixed.steps) == 200
    assert int(s_fixed.evaluations) >= 200  # at least one line-search trial per step
    assert int(s_conv.steps) < 100 and int(s_conv.evaluations) < int(s_fixed.evaluations)
    assert float(v_conv) - 100.0 < 1e-3 * (float(_quadratic(x0, scale)) - 100.0)  # the stop is not premature
    x_plain, v_plain = minimise(_quadratic, x0, (scale,), 200)
    np.testing.assert_allclose(np.asarray(x_plain), np.asarray(x_fixed))
