"""ADP models and local NCS on the shared data: R-free with each variant, same start, same run.

Each dataset's deposited model is refined from the file as deposited (hydrogens removed) by the
default engine with one setting changed per column:

    iso          refine.adp=iso restraints.ncs=off (the reference)
    aniso        refine.adp=aniso
    tls          refine.adp=tls        (input TLS groups when the header has them, else one per chain)
    ncs          restraints.ncs=auto   (isotropic B)
    tls+ncs      refine.adp=tls restraints.ncs=auto
    tls-chain    refine.adp=tls refine.tls_groups=chain (new groups even when the header has some)
    auto         refine.adp=auto       (iso, TLS or aniso by resolution and data per parameter)
    auto+ncs     refine.adp=auto restraints.ncs=auto

With ``--shaken`` every run starts from the shared README's shaken model instead (0.5 Å RMS,
seed 7, hydrogens removed, B = mean, no ANISOU): the start the peers' figures use.

    python benchmarks/bench_adp_ncs.py --runs 4xof:iso,aniso 1va7:iso,ncs,tls,tls+ncs --cycles 5

Prints one line per run (R-work, R-free, RMS bond, wall time, the ADP choice's reason) and appends
the results to benchmarks/results_adp_ncs.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JAXREFINE_DATA", REPO.parent / "shared" / "data"))
VARIANTS = {
    "iso": ["refine.adp=iso", "restraints.ncs=off"],
    "aniso": ["refine.adp=aniso", "restraints.ncs=off"],
    "tls": ["refine.adp=tls", "restraints.ncs=off"],
    "ncs": ["refine.adp=iso", "restraints.ncs=auto"],
    "tls+ncs": ["refine.adp=tls", "restraints.ncs=auto"],
    "tls-chain": ["refine.adp=tls", "refine.tls_groups=chain", "restraints.ncs=off"],
    "auto": ["refine.adp=auto", "restraints.ncs=off"],
    "auto+ncs": ["refine.adp=auto", "restraints.ncs=auto"],
}


def paths(pid):
    folder = DATA / "xray" / pid
    model = next(p for p in sorted(folder.iterdir()) if ".pdb" in p.name or ".cif" in p.name)
    data = next(p for p in sorted(folder.iterdir()) if ".mtz" in p.name)
    return model, data


def run_one(pid, variant, cycles, extra, shaken=False):
    import jaxrefine as jr
    from jaxrefine.io.perturb import shake
    from jaxrefine.refine.engine import refine
    from jaxrefine.validate.waters import water_hooks

    model, data = paths(pid)
    cfg = jr.load_config(None, VARIANTS[variant] + [f"refine.n_cycles={cycles}", f"model.monlib={DATA / 'monomers'}"]
                         + list(extra))
    t0 = time.perf_counter()
    if shaken:
        shaken_model = shake(jr.read_model(model, hydrogens=False), 0.5, seed=7)
        setup = jr.build_setup(None, None, cfg, model=shaken_model, refl=jr.read_reflections(data))
    else:
        setup = jr.build_setup(model, data, cfg)
    result = refine(setup, **water_hooks(cfg))
    kept = result.history[result.best_cycle]
    start = result.history[0]
    return {"pdb": pid, "variant": variant, "cycles": cycles, "extra": list(extra), "start": "shaken" if shaken else "deposited",
            "r_work_start": start.r_work, "r_free_start": start.r_free,
            "r_work": kept.r_work, "r_free": kept.r_free, "rms_bond": kept.rms_bond, "best_cycle": result.best_cycle,
            "wall_s": time.perf_counter() - t0, "adp": getattr(setup, "adp_choice", None) and setup.adp_choice.reason}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", default=["1va7:iso,ncs,tls,tls+ncs"], help="PDB:variant,variant ...")
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], help="extra config overrides for every run")
    ap.add_argument("--shaken", action="store_true", help="start from the shared README's shaken model")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results_adp_ncs.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for spec in args.runs:
        pid, variants = spec.split(":")
        for v in variants.split(","):
            row = run_one(pid, v, args.cycles, args.set, args.shaken)
            rows.append(row)
            print(f"RESULT {pid} {v:8s} start {row['r_work_start']:.4f}/{row['r_free_start']:.4f} -> "
                  f"{row['r_work']:.4f}/{row['r_free']:.4f} rms_bond {row['rms_bond']:.4f} "
                  f"{row['wall_s']:.0f} s  [{row['adp']}]", flush=True)
            old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else []
            Path(args.out).write_text(json.dumps(old + [row], indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
