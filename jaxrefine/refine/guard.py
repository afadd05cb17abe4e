"""The overfitting guard: warnings when R-free and R-work part ways, and the model it keeps.

The guard keeps the latest refined macrocycle whose R-free is within R_FREE_EQUIVALENT of the lowest
refined R-free (``guard.keep_best``), or the input model itself (cycle 0) when no refined macrocycle
lowers the input's R-free (``guard.keep_input``: re-refining a model never ends with R-free above its
start) or when no macrocycle runs.  A refined cycle within issue 14's geometry limits (RMS bond 0.015 Å,
RMS angle 2.0°) wins over one beyond them unless the one beyond has an R-free lower by more than
GEOMETRY_R_FREE_MARGIN (4xof: cycle 5 at 2.001° with R-free 0.177 against cycle 1 at 1.92° with 0.260 — the
limit is a goal, not a cliff); among cycles on the same side of the limits
the R-free rule holds (5e5z, 18 free reflections: cycle 2 with RMS angle 2.65° had R-free 0.2193, cycle 1 with
1.89° 0.2226, a difference a twentieth of R-free's standard error there), and no refined cycle above the input's
R-free is kept.  Later cycles win near-ties: their geometry has had more w_A steering
(5orl: cycle 3 was kept over cycle 5 for 0.0001 of R-free, with RMS bond 0.016 Å; cycle 5 kept: 0.010 Å),
and R-free differences this small are far below its noise.
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

from .monitor import weight_settled
from .weights import MAX_RMS_ANGLE, MAX_RMS_BOND

log = logging.getLogger("jaxrefine")

R_CHANGE_NOISE = 1e-4  # R changes smaller than this are noise: "R-free rose while R-work fell" needs both beyond it
R_FREE_TIE = 1e-6  # a refined cycle replaces the input model only if its R-free is lower by more than this
R_FREE_EQUIVALENT = 0.001  # a later refined cycle replaces an earlier one unless its R-free is above the lowest by more
# a cycle beyond the geometry limits beats one within them only with an R-free lower by more than this: about twice
# R-free's standard error (R_free / sqrt(n_free), Tickle et al. 1998) for 1000-2000 free reflections; 5e5z's 0.0033
# on 18 free reflections keeps the cycle within the limits
GEOMETRY_R_FREE_MARGIN = 0.01


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
    best: float = float("inf")  # the lowest R-free of the refined cycles compared so far (on the kept one's side of the limits)
    in_limits: bool = True  # RMS bond and angle within the geometry limits (within_limits)
    floor: float = float("inf")  # the input model's R-free, when it competes: no refined cycle above it is kept


def within_limits(rms_bond: float, rms_angle: float) -> bool:
    """Whether a model's RMS deviations are within issue 14's limits (those the w_A steering aims below)."""
    return rms_bond <= MAX_RMS_BOND and rms_angle <= MAX_RMS_ANGLE


def keep_better(kept: Kept, candidate: Kept, keep_best: bool = True) -> Kept:
    """The model to keep after ``candidate`` (a later cycle than ``kept``): ``candidate`` when ``keep_best``
    is off.  Otherwise a refined candidate is never kept with an R-free not below the input model's (when the
    input competes: ``kept`` starts as cycle 0 with its R-free, else with R-free inf); it replaces the input
    model; a kept cycle beyond the geometry limits when it is within them, unless the kept one's R-free is lower by more
    than GEOMETRY_R_FREE_MARGIN; a kept cycle within the limits when it is beyond them only with an R-free lower by
    more than that; or a kept cycle on its side of the limits when its R-free is within R_FREE_EQUIVALENT of the
    lowest R-free of that side so far."""
    if not keep_best:
        return candidate
    floor = kept.r_free if kept.cycle == 0 else kept.floor
    if not candidate.r_free < floor - R_FREE_TIE:  # never above the input model
        return kept._replace(floor=floor)
    if kept.cycle == 0 or kept.in_limits != candidate.in_limits:
        if kept.cycle == 0:
            take = True
        elif candidate.in_limits:
            take = not kept.r_free < candidate.r_free - GEOMETRY_R_FREE_MARGIN
        else:
            take = candidate.r_free < kept.r_free - GEOMETRY_R_FREE_MARGIN
        best = candidate.r_free if take else kept.best
    else:
        best = min(kept.r_free, kept.best)
        take = candidate.r_free <= best + R_FREE_EQUIVALENT
        best = min(best, candidate.r_free)
    return (candidate if take else kept)._replace(best=best, floor=floor)


# Stopping on a rising R-free (guard.stop_after_rises): once R-free has risen over the cycle before in that many
# refined cycles in a row, with the weight settled (a cycle with the same w_A cannot undo what it fitted) and the guard
# keeping an earlier cycle, the remaining macrocycles are not run: the guard would return the earlier model anyway
# unless a later cycle came back below it.  From the shaken starts of the shared data (benchmarks/README.md, session
# 26): 1va7 (2.9 Å, w_A settled by its scan after cycle 2) R-free 0.2715, 0.2754, 0.2817, 0.2787 in cycles 2-5 (cycle 5
# is not run: 43 of 266 F evaluations); 5e5z's R-free rises from cycle 2 on, but its w_A is still steered up every
# cycle, so all run; the other five never rise twice in a row.


def r_free_rises(history: list, since: int = 0) -> int:
    """How many of the latest refined cycles in a row have an R-free above the cycle before by more than
    R_CHANGE_NOISE (the first refined cycle, compared with the input, never counts; nor a cycle at or before
    the index ``since``, e.g. where the atoms changed)."""
    n = 0
    for i in range(len(history) - 1, max(1, since), -1):
        if history[i].r_free > history[i - 1].r_free + R_CHANGE_NOISE:
            n += 1
        else:
            break
    return n


def stop_for_rising_r_free(history: list, kept_cycle: int, w_a_next: float, stop_after: int, since: int = 0) -> bool:
    """Whether the macrocycles stop after the latest cycle of ``history`` (see the note above): R-free rose in the
    last ``stop_after`` cycles in a row (0: never stop), the weight has settled
    (:func:`jaxrefine.refine.monitor.weight_settled`, ``w_a_next`` the next cycle's), and the guard keeps an
    earlier cycle (``kept_cycle``)."""
    if stop_after <= 0 or kept_cycle >= history[-1].cycle:
        return False
    return weight_settled(history[-1].w_a, w_a_next) and r_free_rises(history, since) >= stop_after
