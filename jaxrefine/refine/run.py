"""One refinement run from files to an output folder, as one transaction.

The inputs and the output folder are checked before any work; every output (the log too) is
written into a staging folder beside ``out_dir`` and moved into place at the end, so a failed or
interrupted run leaves the previous results as they were.  SIGINT/SIGTERM stop the run at the
next safe point (never inside XLA compilation) with :class:`Interrupted`.
"""
from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import signal
import threading

from ..config import Config
from ..core import timing
from ..errors import InputError
from ..io.model import check_b_limits, check_restraint_dictionary
from ..io.reflections import read_map_coefficients
from ..io.topology import find_monlib
from ..io.writers import check_output_folder, protect, staged_output, write_json
from ..problem.setup import build_setup, load_inputs
from ..core.cache import compile_counters, enable_compilation_cache
from .engine import HEADER, format_cycle, prepare_refinement, refine
from .outputs import write_outputs

log = logging.getLogger("jaxrefine")

FAILED_LOG = "refine.failed.log"  # the log of a failed run, left beside the previous results
OUTPUT_FILES = ("refined.cif", "refined.pdb", "maps.mtz", "metrics.json", "config.yaml", "run.json", "refine.log",
                "r_vs_cycle.png", "2fofc.ccp4", "fofc.ccp4", FAILED_LOG)


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM ended the run at a safe point; nothing was written.

    Attributes:
        exit_code: 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, cycle: int | None):
        self.exit_code = 128 + int(signum)
        self.cycle = cycle
        when = f"after cycle {cycle}" if cycle is not None else "before the first cycle"
        super().__init__(f"interrupted ({signal.Signals(signum).name}) {when}; nothing written")


class _SignalGuard:
    """Turn SIGINT/SIGTERM into :class:`Interrupted` at safe points.

    The first signal only records itself (raising inside XLA compilation can crash the process);
    :meth:`check`, called between macrocycles, then raises.  A second signal raises at once.
    Handlers are installed only in the main thread and restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    NOTICE_WAIT_S = 2.0  # how long a safe point waits for the notice's thread to log it

    def __init__(self):
        self.signum = None
        self.cycle = None
        self._old = {}
        self._notice = None  # the thread that logs the first signal's notice

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._wait_for_notice()  # before the caller's last line
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise Interrupted(signum, self.cycle)
        self.signum = signum
        # Logged by a thread of its own: the handler runs between two bytecodes of the main thread, which may be
        # in the middle of writing a log record, and writing to the same buffered stream from here raises
        # "reentrant call" (printed as a "--- Logging error ---" traceback).  The thread waits for the log
        # handler's lock instead, which the interrupted write releases.
        self._notice = threading.Thread(
            target=log.warning, args=("%s received: stopping at the end of this step (again to stop at once)",
                                      signal.Signals(signum).name), name="jaxrefine-signal-notice", daemon=True)
        self._notice.start()

    def _wait_for_notice(self):
        if self._notice is not None:
            self._notice.join(self.NOTICE_WAIT_S)

    def check(self, cycle=None):
        if cycle is not None:
            self.cycle = cycle
        if self.signum is not None:
            self._wait_for_notice()
            raise Interrupted(self.signum, self.cycle)


@contextlib.contextmanager
def _logging_to(handler):
    """Send the ``jaxrefine`` log (INFO and up) to ``handler`` for the duration of the block."""
    root = logging.getLogger("jaxrefine")
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def preflight(model_path, data_path, out_dir, cfg: Config):
    """Everything that can be checked before any work: the output folder, ligand dictionaries,
    the model (values, B limits) and the data (columns, free set), read once and returned.

    Returns:
        (model, refl) as :func:`jaxrefine.problem.setup.load_inputs` returns them.

    Raises:
        InputError, DataMismatchError: one line naming the file and what to do.
    """
    inputs = [model_path, data_path, *cfg.model.ligands]
    protect(*inputs)
    check_output_folder(out_dir, OUTPUT_FILES, inputs)
    for p in cfg.model.ligands:
        check_restraint_dictionary(p)
    find_monlib(cfg.model.monlib)
    model, refl = load_inputs(model_path, data_path, cfg)
    check_b_limits(model, cfg.refine.b_max, cfg.refine.b_min)
    return model, refl


def _record_data(metrics: dict, refl) -> dict:
    """metrics.json entries on the data as used: free set (generated or read) and cleaning counts."""
    metrics["free_set"] = {
        "generated": refl.free_convention.startswith("generated"), "convention": refl.free_convention,
        "column": refl.columns.get("FREE"), "n_free": refl.n_free, "n_work": refl.n_work,
    }
    metrics["reflections_removed"] = dict(refl.n_removed)
    return metrics


def _write_ccp4_maps(stage) -> None:
    from ..io.maps_io import map_from_coefficients, write_ccp4_map

    for label, name in (("2FOFCWT", "2fofc.ccp4"), ("FOFCWT", "fofc.ccp4")):
        crystal, hkl, coef = read_map_coefficients(os.path.join(stage, "maps.mtz"), label, "PH" + label)
        write_ccp4_map(os.path.join(stage, name), crystal, map_from_coefficients(crystal, hkl, coef))


def run_refinement(model_path, data_path, out_dir, cfg: Config | None = None, progress=None, plot_title: str | None = None,
                   after_minimise=(), between_cycles=(), startup_s: float | None = None) -> dict:
    """Read, refine, write.  Returns the metrics dict (as in metrics.json, with its ``timing``).

    Args:
        progress: callable taking one line of text per macrocycle (e.g. ``print`` in a notebook; the
            CLI leaves it None because its logging already shows the lines).
        plot_title: title of the R-vs-cycle plot (``output.plots``).
        after_minimise, between_cycles: actions run in each macrocycle (see
            :func:`jaxrefine.refine.engine.refine`); the CLI passes the water actions of
            :func:`jaxrefine.validate.waters.water_hooks`.  None by default.
        startup_s: seconds the process spent starting before this call (interpreter, imports),
            recorded as ``timing.start_s`` (the CLI passes it).

    Raises:
        JaxrefineError: bad input, before any refinement where it can be told.
        Interrupted: SIGINT/SIGTERM; ``out_dir`` is left as it was.
        InputError: also when the disk is full or the folder cannot be written; ``out_dir`` is left
            as it was.  On an error after the inputs were read, the log is kept as
            ``out_dir/refine.failed.log``.
    """
    with timing.recording(compile_clock=compile_counters) as rec:
        if startup_s is not None:
            rec.add("start", startup_s)
        return _refine_files(model_path, data_path, out_dir, cfg, progress, plot_title, after_minimise, between_cycles)


def _refine_files(model_path, data_path, out_dir, cfg, progress, plot_title, after_minimise, between_cycles) -> dict:
    cfg = cfg or Config()
    early = logging.handlers.BufferingHandler(capacity=100_000)  # what the checks log goes to refine.log too
    with _SignalGuard() as guard:
        with _logging_to(early), timing.section("read"):
            inputs = preflight(model_path, data_path, out_dir, cfg)
        guard.check()
        with _naming_the_folder(out_dir), staged_output(out_dir, managed=OUTPUT_FILES) as stage:
            log_path = os.path.join(stage, "refine.log")
            handler = logging.FileHandler(log_path, mode="w")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            for record in early.buffer:
                handler.handle(record)
            with _logging_to(handler):
                try:
                    metrics = _run(model_path, data_path, inputs, stage, cfg, progress, plot_title, after_minimise,
                                   between_cycles, guard)
                except Exception as exc:
                    log.error("%s: %s", type(exc).__name__, exc)
                    handler.flush()
                    _keep_failed_log(log_path, out_dir)
                    raise
                finally:
                    handler.close()
            guard.check()
        return metrics


@contextlib.contextmanager
def _naming_the_folder(out_dir):
    """A write error (full disk, read-only folder) names ``out_dir``, not the staging file."""
    try:
        yield
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot write the results ({exc.strerror or exc}); the folder is as it was: "
                         f"free some disk space or choose another --out") from exc


def _keep_failed_log(log_path, out_dir) -> None:
    """Copy the log of a failed run (it records the error) to ``out_dir/refine.failed.log``."""
    if not log_path or not os.path.exists(log_path):
        return
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(log_path) as src, open(os.path.join(out_dir, FAILED_LOG), "w") as dst:
            dst.write(src.read())
    except OSError:  # a full or read-only disk: the error line on stderr is all there is
        pass


def _run(model_path, data_path, inputs, stage, cfg, progress, plot_title, after_minimise, between_cycles, guard) -> dict:
    cache = enable_compilation_cache(cfg.runtime.compilation_cache, cfg.runtime.cache_max_mb)
    log.info("compilation cache: %s", cache or "off")
    model, refl = inputs
    with timing.section("setup"):
        setup = build_setup(model_path, data_path, cfg, model=model, refl=refl, on_problem=prepare_refinement(cfg))
    refl = setup.refl
    log.info("%s: %d atoms; %s: %d reflections (%d free), %.2f-%.2f Å; monomer library: %s",
             model_path, setup.model.n_atoms, data_path, refl.n, refl.n_free, refl.d_max, refl.d_min, setup.monlib or "built-in")
    log.info("free set: %d reflections, %s", refl.n_free, refl.free_convention)
    guard.check()

    def cb(st):
        if progress is not None:
            if st.cycle == 0:
                progress(HEADER)
            progress(format_cycle(st))
        guard.check(st.cycle)

    result = refine(setup, callback=cb, after_minimise=after_minimise, between_cycles=between_cycles)
    for w in result.warnings:
        if progress is not None:
            progress("warning: " + w)
    guard.check()
    rec = timing.current()
    rec.end_cycles()
    with timing.section("write"):
        metrics = _record_data(write_outputs(result, setup, stage), refl)
    metrics["timing"] = rec.as_dict()
    for line in rec.summary_lines():
        log.info(line)
    write_json(os.path.join(stage, "metrics.json"), metrics)
    if cfg.output.ccp4_maps:
        _write_ccp4_maps(stage)
    if cfg.output.plots:
        from ..io.figures import plot_r_vs_cycle

        kw = {"title": plot_title} if plot_title else {}
        plot_r_vs_cycle(metrics["cycles"], os.path.join(stage, "r_vs_cycle.png"), **kw)
    return metrics
