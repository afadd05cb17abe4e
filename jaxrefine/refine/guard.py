"""The overfitting guard: warnings when R-free and R-work part ways, and the model it keeps.

The guard keeps the refined macrocycle with the lowest R-free (``guard.keep_best``), or the input
model itself (cycle 0) when no refined macrocycle lowers the input's R-free (``guard.keep_input``:
re-refining a model never ends with R-free above its start) or when no macrocycle runs.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

log = logging.getLogger("jaxrefine")

R_CHANGE_NOISE = 1e-4  # R changes smaller than this are noise: "R-free rose while R-work fell" needs both beyond it
R_FREE_TIE = 1e-6  # a later cycle is kept only if its R-free is lower by more than this (ties keep the earlier model)


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


def keep_better(kept: Kept, candidate: Kept, keep_best: bool = True) -> Kept:
    """``candidate`` when its R-free is lower (or when ``keep_best`` is off), else ``kept``."""
    if not keep_best or candidate.r_free < kept.r_free - R_FREE_TIE:
        return candidate
    return kept
