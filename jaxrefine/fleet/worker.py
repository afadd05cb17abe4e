"""One fleet entry, run inside a Dask worker: refine, apply the never-worse rule, write result.json.

Everything an entry does stays in ``DIR/<id>/``: the outputs of ``jaxrefine refine`` and
``result.json`` (its row of the results table, written atomically last, so that a fleet killed
halfway finds exactly the entries that finished).
"""
from __future__ import annotations

import os
import shutil
import time

from ..config import apply_overrides, config_from_dict
from ..io.writers import write_json
from ..core.cache import enable_compilation_cache
from ..core.malloc_options import apply_malloc_defaults
from ..refine.run import run_refinement
from ..validate.waters import water_hooks

RESULT_FILE = "result.json"
# Never worse (PDB_REDO's rule): the input model is kept when refinement raises R-free by more than
# this.  0.002 is well above the float32 run-to-run spread of R-free (~1e-4) and a fifth of the 0.01
# change usually read as significant, so a refinement that is no better than its input is not
# reported as an improvement.
KEEP_INPUT_TOLERANCE = 0.002
STATUSES = ("refined", "kept input", "failed")

_compile = {"seconds": 0.0, "hits": 0}
_listening = False
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def _listen_to_compiles() -> None:
    """Sum JAX's tracing/lowering/compiling (or cache-loading) time in this process."""
    global _listening
    if _listening:
        return
    import jax.monitoring as mon

    def duration(event, secs, **_):
        if event in _COMPILE_EVENTS:
            _compile["seconds"] += secs

    def count(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            _compile["hits"] += 1

    mon.register_event_duration_secs_listener(duration)
    mon.register_event_listener(count)
    _listening = True


def one_line(exc: BaseException) -> str:
    """An error as one line: jaxrefine's own messages as they are, others with their type."""
    from ..errors import JaxrefineError

    text = " ".join(str(exc).split()) or repr(exc)
    return text if isinstance(exc, JaxrefineError) else f"{type(exc).__name__}: {text}"


def result_path(out_root: str, entry_id: str) -> str:
    return os.path.join(out_root, entry_id, RESULT_FILE)


def empty_record(entry) -> dict:
    return {"id": entry.id, "status": "failed", "r_work_in": None, "r_free_in": None, "r_work": None, "r_free": None,
            "r_free_refined": None, "rms_bond": None, "rms_angle": None, "w_a": None, "adp": None,
            "wall_s": None, "compile_s": None, "cache_hits": None, "model_out": None, "error": "",
            "entry": entry.as_dict()}


def failed_record(entry, error: str, wall_s: float | None = None) -> dict:
    rec = empty_record(entry)
    rec.update(status="failed", error=error, wall_s=wall_s)
    return rec


def adp_model(cfg) -> str:
    """What the entry's B-factors were: refined isotropic B (over kept ANISOU shapes) or fixed."""
    if cfg.refine.strategy in ("rigid", "xyz"):
        return "fixed"
    return "isotropic" + (" + ANISOU shapes" if cfg.refine.keep_anisou else "")


def never_worse(metrics: dict, entry, out_dir: str, tolerance: float = KEEP_INPUT_TOLERANCE) -> dict:
    """Row fields for a finished refinement: keep the input model when refinement made R-free worse.

    The input's R-factors are the engine's cycle 0 (same data, free flags, mask and scaling as the
    refinement).  When kept, the input model is copied into ``out_dir`` beside ``refined.cif``.
    """
    first = metrics["cycles"][0]
    refined = metrics.get("r_free_refined")
    refined = metrics["r_free"] if refined is None else refined
    # the engine's guard may already have kept the input (best_cycle 0: no refined cycle beat it)
    worse = metrics.get("best_cycle") == 0 and len(metrics["cycles"]) > 1 or metrics["r_free"] > first["r_free"] + tolerance
    kept = first if worse else metrics
    if worse:
        name = "input_" + os.path.basename(entry.model)
        shutil.copyfile(entry.model, os.path.join(out_dir, name))
    else:
        name = "refined.cif"
    return {"status": "kept input" if worse else "refined", "r_work_in": first["r_work"], "r_free_in": first["r_free"],
            "r_work": kept["r_work"], "r_free": kept["r_free"], "r_free_refined": refined,
            "rms_bond": kept["rms_bond"], "rms_angle": kept["rms_angle"], "w_a": metrics["w_a"],
            "model_out": os.path.join(entry.id, name)}


def run_entry(entry, out_root: str, base_config: dict, tolerance: float = KEEP_INPUT_TOLERANCE) -> dict:
    """Refine one entry into ``out_root/<id>/`` and return its row (also written as result.json).

    Args:
        entry: a :class:`jaxrefine.fleet.manifest.Entry`.
        out_root: the fleet's output folder.
        base_config: the shared configuration as nested dicts (``config_to_dict``).
        tolerance: R-free rise above which the input model is kept.

    Any exception is caught: the entry fails with a one-line error and the fleet goes on.
    """
    t0 = time.perf_counter()
    out_dir = os.path.join(out_root, entry.id)
    os.makedirs(out_dir, exist_ok=True)
    rec = empty_record(entry)
    apply_malloc_defaults()  # a Dask worker process does not start through the command line (core/malloc_options.py)
    _listen_to_compiles()
    c0, h0 = _compile["seconds"], _compile["hits"]
    try:
        cfg = config_from_dict(apply_overrides(base_config, entry.config_overrides()))
        enable_compilation_cache(cfg.runtime.compilation_cache, cfg.runtime.cache_max_mb)  # shared by all workers of this machine
        rec["adp"] = adp_model(cfg)
        metrics = run_refinement(entry.model, entry.data, out_dir, cfg, **water_hooks(cfg))  # as the CLI: bad waters removed
        rec.update(never_worse(metrics, entry, out_dir, tolerance))
    except Exception as exc:  # failures stay local: the row carries the error
        rec.update(status="failed", error=one_line(exc))
    rec.update(wall_s=time.perf_counter() - t0, compile_s=_compile["seconds"] - c0, cache_hits=_compile["hits"] - h0)
    write_json(result_path(out_root, entry.id), rec)
    return rec
