"""Command-line entry point: a thin layer over the Python API.

Each subcommand lives in ``jaxrefine/commands/<name>.py`` and defines ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``.  Modules are imported only when their
command runs, so ``jaxrefine info`` starts without importing JAX.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import JaxrefineError

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
}


def _available():
    out = {}
    for name, helptext in COMMANDS.items():
        if importlib.util.find_spec(f"jaxrefine.commands.{name}") is not None:
            out[name] = helptext
    return out


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="jaxrefine", description="Differentiable X-ray refinement in JAX")
    parser.add_argument("--version", action="version", version=f"jaxrefine {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, helptext in _available().items():
        mod = importlib.import_module(f"jaxrefine.commands.{name}")
        p = sub.add_parser(name, help=helptext, description=getattr(mod, "HELP", helptext))
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        return int(args._module.run(args) or 0)
    except JaxrefineError as exc:
        print(f"jaxrefine {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
