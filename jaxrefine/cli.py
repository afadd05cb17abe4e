"""Command-line entry point: a thin layer over the Python API.

Each subcommand lives in ``jaxrefine/commands/<name>.py`` and defines ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``.  Modules are imported only when their
command runs, so ``jaxrefine info`` starts without importing JAX.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
import warnings

from .core.malloc_options import apply_malloc_defaults
from .errors import ConfigError, JaxrefineError

# name -> one-line help; the module jaxrefine.commands.<name> implements it
COMMANDS = {
    "info": "summarise a model and (optionally) its reflection data",
    "sf": "compute structure factors of a model and write them to MTZ",
    "rfactors": "R-work/R-free, bulk solvent and scaling for a model as given",
    "geometry": "geometry report (RMS deviations from the restraint dictionary)",
    "refine": "refine a model against X-ray data",
    "demo": "refine a built-in synthetic test crystal (no files needed)",
    "omit": "omit maps for a selection",
    "validate": "per-residue density fit and register-shift scan",
    "uncertainty": "per-atom coordinate and B uncertainties (esds) of a model as given",
    "batch": "refine many datasets on Dask (a manifest or a folder pattern), never worse than the input",
}


def _available():
    out = {}
    for name, helptext in COMMANDS.items():
        if importlib.util.find_spec(f"jaxrefine.commands.{name}") is not None:
            out[name] = helptext
    return out


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``jaxrefine: OPTION: what is wrong; see --help`` (exit 2)."""

    def error(self, message):
        command = self.prog.removeprefix("jaxrefine").strip()
        print(f"jaxrefine: {command + ': ' if command else ''}{message}; see '{self.prog} --help'", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="jaxrefine", description="Differentiable X-ray refinement in JAX")
    parser.add_argument("--version", action="version", version=f"jaxrefine {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks of errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, helptext in _available().items():
        mod = importlib.import_module(f"jaxrefine.commands.{name}")
        p = sub.add_parser(name, help=helptext, description=getattr(mod, "HELP", helptext))
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def _quiet_backends() -> None:
    """No backend noise: JAX logs 'Unable to initialize backend ...' for every platform it probes,
    and warns each time float64 is asked for while x64 is off (float32 is then the intended
    working precision).  ``-v`` shows both."""
    for name in ("jax._src.xla_bridge", "jax._src.compiler", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Explicitly requested dtype float64", category=UserWarning)


def _error_line(exc: BaseException) -> tuple[str, int]:
    """(one line for the user, exit status) for an exception that ends a command."""
    if isinstance(exc, KeyboardInterrupt):  # refine.run.Interrupted carries its own line and status
        return str(exc) or "interrupted; nothing written", getattr(exc, "exit_code", 130)
    if isinstance(exc, ConfigError):
        return str(exc), 2
    if isinstance(exc, JaxrefineError):
        return str(exc), 1
    if isinstance(exc, OSError):
        where = exc.filename or "output"
        what = exc.strerror or str(exc)
        return f"{where}: {what}; check the path, its permissions and the free disk space", 1
    if isinstance(exc, MemoryError) or "RESOURCE_EXHAUSTED" in str(exc):  # XLA reports its allocation failures so
        return "out of memory; use a higher resolution limit (--d-min) or a machine with more memory", 1
    return f"internal error ({type(exc).__name__}: {exc}); rerun with -v for the traceback and report it", 1


def main(argv=None) -> int:
    """Run one command; returns the exit status (0 ok, 1 error, 2 usage error, 130/143 interrupted).

    Every error ends in one line on stderr, ``jaxrefine: FILE-or-OPTION: what is wrong; what to
    do``; the traceback only with ``-v``.
    """
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (already reported), --help and --version (0)
        return exc.code if isinstance(exc.code, int) else 0
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if not args.verbose:
        _quiet_backends()
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("jaxrefine")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(level)
    try:
        return int(args._module.run(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:
        if args.verbose:
            traceback.print_exc()
        line, status = _error_line(exc)
        print(f"jaxrefine: {' '.join(line.split())}", file=sys.stderr)
        return status
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def console_main() -> None:
    """The ``jaxrefine`` command (and ``python -m jaxrefine.cli``): :func:`main`, then a quick exit.

    Once the outputs are written, the log files closed and the streams flushed, the process ends with
    ``os._exit``: Python's finalisation of JAX's backend (its executables, buffers and thread pools) took
    0.5–0.7 s of a 3–5 s refinement (5e5z, warm).  When other Python threads or child processes are still
    alive (a fleet's Dask workers), the normal exit runs instead.  :func:`main` itself returns as usual
    (tests and notebooks call it in-process).
    """
    apply_malloc_defaults()  # before the command's first large allocation (core/malloc_options.py)
    status = main()
    from .core.cache import prune_registered

    prune_registered()  # the cache folder's size limit (runtime.cache_max_mb): os._exit below skips atexit
    logging.shutdown()  # flush and close every log handler (refine.log)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: leave it to the normal exit
        sys.exit(status)
    import multiprocessing
    import threading

    if threading.active_count() == 1 and not multiprocessing.active_children():
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    console_main()
