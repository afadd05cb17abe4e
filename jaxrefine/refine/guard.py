"""The overfitting guard: warnings when R-free and R-work part ways, and the model it keeps.

The guard keeps the latest refined macrocycle whose R-free is within R_FREE_EQUIVALENT of the lowest
refined R-free (``guard.keep_best``), or the input model itself (cycle 0) when no refined macrocycle
lowers the input's R-free (``guard.keep_input``: re-refining a model never ends with R-free above its
start) or when no macrocycle runs.  Later cycles win near-ties: their geometry has had more w_A steering
(5orl: cycle 3 was kept over cycle 5 for 0.0001 of R-free, with RMS bond 0.016 Å; cycle 5 kept: 0.010 Å),
and R-free differences this small are far below its noise.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

log = logging.getLogger("jaxrefine")

R_CHANGE_NOISE = 1e-4  # R changes smaller than this are noise: "R-free rose while R-work fell" needs both beyond it
R_FREE_TIE = 1e-6  # a refined cycle replaces the input model only if its R-free is lower by more than this
R_FREE_EQUIVALENT = 0.001  # a later refined cycle replaces an earlier one unless its R-free is above the lowest by more


def overfitting_warnings(history: list, max_gap: float) -> list:
    """Messages (also logged as warnings) for the latest of the :class:`jaxrefine.refine.monitor.CycleStats`.

    Args:
        history: the cycles so far (at least two).
        max_gap: largest acceptable R-free − R-work (``guard.max_gap``).
    """
    out = []
    cur, prev = history[-1], history[-2]
    if cur.r_free > prev.r_free + R_CHANGE_NOISE and cur.r_work < prev.r_work - R_CHANGE_NOISE:
        out.append(
            f"cycle {cur.cycle}: R-free rose ({prev.r_free:.4f} -> {cur.r_free:.4f}) while R-work fell "
            f"({prev.r_work:.4f} -> {cur.r_work:.4f}): the model is fitting noise; raise w_A (weights.w_a) or refine fewer parameters"
        )
    gap = cur.r_free - cur.r_work
    if gap > max_gap:
        out.append(
            f"cycle {cur.cycle}: R-free - R-work = {gap:.3f} exceeds {max_gap:.3f}; likely overfitting: "
            f"raise w_A or restrain B more (weights.w_b)"
        )
    for m in out:
        log.warning(m)
    return out


class Kept(NamedTuple):
    """The model the guard keeps: its R-free, cycle, and the refinement it belongs to."""

    r_free: float
    cycle: int
    params: Any
    problem: Any
    state: Any
    setup: Any
    best: float = float("inf")  # the lowest R-free of the refined cycles compared so far


def keep_better(kept: Kept, candidate: Kept, keep_best: bool = True) -> Kept:
    """The model to keep after ``candidate`` (a later cycle than ``kept``): ``candidate`` when ``keep_best``
    is off; against the input model (cycle 0), when its R-free is lower; against a refined cycle, when its
    R-free is within R_FREE_EQUIVALENT of the lowest refined R-free so far."""
    best = min(kept.r_free, kept.best) if kept.cycle > 0 else float("inf")
    if not keep_best:
        return candidate
    if kept.cycle == 0:
        take = candidate.r_free < kept.r_free - R_FREE_TIE
    else:
        take = candidate.r_free <= best + R_FREE_EQUIVALENT
    best = min(best, candidate.r_free)
    return candidate._replace(best=best) if take else kept._replace(best=best)
