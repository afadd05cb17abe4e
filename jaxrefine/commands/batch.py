"""``jaxrefine batch MANIFEST --out DIR [--workers N] [--scheduler ADDRESS] [--config FILE] [--set ...]``."""
from __future__ import annotations

HELP = (
    "Refine many datasets on Dask (a LocalCluster, or --scheduler ADDRESS): one output folder per entry, "
    "DIR/results.csv and results.md with one row per entry. An entry whose refined R-free is worse than its "
    "input's keeps the input model; a failing entry fails alone; rerunning skips finished entries."
)


def add_arguments(p):
    p.add_argument("manifest", help="YAML or CSV list of entries (id, model, data[, labin, ligands, monlib, set]), "
                                    "or a quoted pattern of model files such as 'screen/*/model.pdb' (data beside each)")
    p.add_argument("--out", "-o", required=True, help="output folder: <id>/ per entry, results.csv, results.md")
    p.add_argument("--workers", "-j", type=int, default=2, help="worker processes of the local Dask cluster (default 2)")
    p.add_argument("--scheduler", help="address of a running Dask scheduler (e.g. tcp://host:8786) instead of a local cluster")
    p.add_argument("--config", "-c", help="shared YAML config (see configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="shared config override, e.g. --set refine.n_cycles=3 (an entry's own settings come after)")
    p.add_argument("--monlib", help="CCP4 monomer library folder for every entry (model.monlib)")
    p.add_argument("--retry-failed", action="store_true", help="run failed entries again (finished ones are always skipped)")
    p.add_argument("--keep-tolerance", type=float, default=None,
                   help="keep the input model when refinement raises R-free by more than this (default 0.002)")


def run(args) -> int:
    from ..errors import ConfigError
    from ..fleet import KEEP_INPUT_TOLERANCE, refine_many

    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: need at least 1")
    sets = list(args.set) + ([f"model.monlib={args.monlib}"] if args.monlib else [])
    tol = KEEP_INPUT_TOLERANCE if args.keep_tolerance is None else args.keep_tolerance
    rows = refine_many(args.manifest, args.out, scheduler=args.scheduler, workers=args.workers, config=args.config,
                       overrides=sets, retry_failed=args.retry_failed, tolerance=tol)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("refined", "kept input", "failed")}
    print(f"{len(rows)} entries: {counts['refined']} refined, {counts['kept input']} kept input, {counts['failed']} failed")
    print(f"wrote {args.out}/results.csv, results.md and one folder per entry")
    return 0
