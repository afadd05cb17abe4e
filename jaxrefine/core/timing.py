"""Where a run's wall time goes: named sections, per macrocycle, for the log and metrics.json.

Plain Python (no JAX), so every layer can mark its work.  A run opens a recorder; code marks
sections, which cost nothing when no recorder is open::

    with recording(compile_clock=compile_counters) as rec:   # refine/run.py
        with section("read"): ...
        rec.begin_cycle(1)
        with section("optimise"): ...                        # refine/engine.py
        count("evaluations", 37)
    rec.as_dict()  # {"read_s": ..., "cycles": [{"cycle": 1, "optimise_s": ..., "evaluations": 37,
                   #   "host_s": {"mask": ...}, "compile_s": ...}], ...}

JAX dispatches work asynchronously: a section that launches device work must wait for its
result (``jax.block_until_ready``) before it ends, or the time lands in a later section.

Section names: ``read``, ``setup``, ``write`` (run level); ``optimise`` (a macrocycle's
minimisation); host-side updates between minimisations, reported together under ``host_s``:
``mask``, ``scales``, ``sigma_a``, ``neighbours``, ``geometry``, ``statistics``, ``waters``.
"""
from __future__ import annotations

import contextlib
import os
import time

RUN_SECTIONS = ("start", "read", "setup", "write")
CYCLE_SECTIONS = ("optimise",)  # the rest of a cycle's sections are host-side updates

_active = []  # the open recorders, innermost last


class Timing:
    """Accumulated wall time (s) per section and counts, for the whole run and per macrocycle.

    Args:
        compile_clock: optional callable returning running compile totals (a dict with
            ``trace_s``, ``lower_s``, ``compile_s``, ``cache_hits``, ``cache_misses``), e.g.
            :func:`jaxrefine.core.cache.compile_counters`; the time spent compiling is then
            reported per run and per macrocycle.
    """

    def __init__(self, compile_clock=None):
        self.t0 = time.perf_counter()
        self.run = {}
        self.cycles = []
        self._clock = compile_clock
        self._compile0 = compile_clock() if compile_clock else None
        self._cycle_compile0 = None
        self._cycle_t0 = None

    # -- recording
    def add(self, name: str, seconds: float) -> None:
        target = self.cycles[-1]["sections"] if self.cycles and name not in RUN_SECTIONS else self.run
        target[name] = target.get(name, 0.0) + seconds

    def count(self, name: str, n) -> None:
        target = self.cycles[-1]["counts"] if self.cycles else self.run
        target[name] = target.get(name, 0) + int(n)

    def begin_cycle(self, cycle: int) -> None:
        """Start the record of macrocycle ``cycle``; it ends when the next one begins."""
        self._close_cycle()
        self.cycles.append({"cycle": int(cycle), "sections": {}, "counts": {}})
        self._cycle_t0 = time.perf_counter()
        self._cycle_compile0 = self._clock() if self._clock else None

    def end_cycles(self) -> None:
        """Close the last macrocycle (sections after this count for the run)."""
        self._close_cycle()

    def _close_cycle(self) -> None:
        if not self.cycles or "wall_s" in self.cycles[-1]:
            return
        c = self.cycles[-1]
        c["wall_s"] = time.perf_counter() - self._cycle_t0
        if self._clock:
            c["compile"] = _delta(self._clock(), self._cycle_compile0)

    # -- reporting
    def as_dict(self) -> dict:
        """The ``timing`` record of metrics.json (seconds; counts as integers)."""
        self._close_cycle()
        out = {f"{k}_s": round(v, 3) for k, v in self.run.items() if not isinstance(v, int)}
        out.update({k: v for k, v in self.run.items() if isinstance(v, int)})
        out["total_s"] = round(time.perf_counter() - self.t0 + self.run.get("start", 0.0), 3)
        if self._clock:
            comp = _delta(self._clock(), self._compile0)
            out["compile_s"] = comp["total_s"]
            out["compile"] = comp
        cycles = []
        for c in self.cycles:
            sec = c["sections"]
            row = {"cycle": c["cycle"], "wall_s": round(c.get("wall_s", 0.0), 3)}
            row.update({f"{k}_s": round(sec[k], 3) for k in CYCLE_SECTIONS if k in sec})
            row["host_s"] = {k: round(v, 3) for k, v in sec.items() if k not in CYCLE_SECTIONS}
            row.update(c["counts"])
            if "compile" in c:
                row["compile_s"] = c["compile"]["total_s"]
            cycles.append(row)
        out["cycles"] = cycles
        return out

    def summary_lines(self) -> list:
        """A few log lines: the run's split and one line per macrocycle."""
        d = self.as_dict()
        head = ", ".join(f"{k[:-2]} {d[k]:.1f} s" for k in ("start_s", "read_s", "setup_s", "compile_s", "write_s", "total_s")
                         if k in d)
        lines = [f"timing: {head}"]
        for c in d["cycles"]:
            host = " ".join(f"{k} {v:.2f}" for k, v in c["host_s"].items())
            comp = f", compile {c['compile_s']:.1f} s" if "compile_s" in c else ""
            lines.append(f"timing: cycle {c['cycle']}: {c['wall_s']:.1f} s = optimise {c.get('optimise_s', 0.0):.1f} s "
                         f"({c.get('steps', 0)} steps, {c.get('evaluations', 0)} F evaluations{comp}) + host: {host}")
        return lines


def _delta(now: dict, before: dict) -> dict:
    out = {k: now[k] - before.get(k, 0) for k in now}
    out["total_s"] = out.get("trace_s", 0.0) + out.get("lower_s", 0.0) + out.get("compile_s", 0.0)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()}


@contextlib.contextmanager
def recording(compile_clock=None):
    """Open a :class:`Timing` recorder for the duration of the block (sections go to it)."""
    rec = Timing(compile_clock)
    _active.append(rec)
    try:
        yield rec
    finally:
        _active.remove(rec)


def current() -> Timing | None:
    """The innermost open recorder, or None."""
    return _active[-1] if _active else None


@contextlib.contextmanager
def section(name: str):
    """Add the wall time of the block to section ``name`` of the open recorder (if any)."""
    rec = current()
    if rec is None:
        yield
        return
    t = time.perf_counter()
    try:
        yield
    finally:
        rec.add(name, time.perf_counter() - t)


def count(name: str, n=1) -> None:
    """Add ``n`` to counter ``name`` (e.g. ``evaluations``) of the open recorder (if any)."""
    rec = current()
    if rec is not None:
        rec.count(name, n)


def begin_cycle(cycle: int) -> None:
    """Mark the start of macrocycle ``cycle`` in the open recorder (if any)."""
    rec = current()
    if rec is not None:
        rec.begin_cycle(cycle)


def process_age_s() -> float:
    """Seconds since this process started (interpreter start-up and imports), 0 where unknown."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = float(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0
