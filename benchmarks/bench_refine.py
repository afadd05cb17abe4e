"""jaxrefine vs servalcat (and TorchRef where installed) on the shared datasets, same yardstick.

For each dataset: the deposited model (hydrogens removed), shaken as in the shared data README
(0.5 Å RMS, seed 7, B reset to the mean, ANISOU dropped), is refined for N macrocycles by each
program; every final model is then scored by ``servalcat refine_xtal_norefmac --ncycle 0`` so all
programs are measured the same way.  Wall times are for the refinement alone, same machine, same run.

    python benchmarks/bench_refine.py [--datasets 5e5z 1va7 ...] [--cycles 10] [--servalcat PATH] [--torchref PATH]

servalcat is found on PATH or given with --servalcat (it is on PyPI: pip install servalcat, ideally in
its own virtual environment).  Prints a table and writes benchmarks/results_refine.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JAXREFINE_DATA", REPO.parent / "shared" / "data"))
LABIN = {"5e5z": "FP,SIGFP,FREE", "4xof": "FP,SIGFP,FreeR_flag", "1l2h": "IMEAN,SIGIMEAN,FreeR_flag",
         "5orl": "FP,SIGFP,FREE", "4iid": "FP,SIGFP,FREE", "1va7": "FOBS,SIGFOBS,R-free-flags",
         "5kzb": "FOBS,SIGFOBS,R-free-flags"}
ORDER = ("5e5z", "1va7", "5kzb", "4xof", "1l2h", "5orl", "4iid")


def paths(pid):
    folder = DATA / "xray" / pid
    model = next(p for p in sorted(folder.iterdir()) if ".pdb" in p.name or ".cif" in p.name)
    data = next(p for p in sorted(folder.iterdir()) if ".mtz" in p.name)
    return model, data


def make_shaken(pid, out_dir):
    from jaxrefine.io.model import read_model
    from jaxrefine.io.writers import write_model
    from jaxrefine.io.perturb import shake

    model_path, _ = paths(pid)
    m = read_model(model_path, hydrogens=False)
    s = shake(m, 0.5, seed=7)
    out = Path(out_dir) / f"{pid}_shaken.pdb"
    write_model(s, out, b_iso=s.b_iso)
    return out


def servalcat_score(servalcat, model, pid, work, ncycle=0):
    """(r_work, r_free, rms_bond, rms_angle, wall_s) from servalcat refine_xtal_norefmac."""
    _, data = paths(pid)
    prefix = Path(work) / f"sv_{pid}_{ncycle}_{Path(model).stem}"
    cmd = [servalcat, "refine_xtal_norefmac", "--model", str(model), "--hklin", str(data), "--labin", LABIN[pid],
           "--free", "0", "-s", "xray", "--monlib", str(DATA / "monomers"), "--ncycle", str(ncycle), "-o", str(prefix)]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - t
    text = out.stdout + out.stderr
    rw = re.findall(r"R(?:work)?\s*=\s*([0-9.]+)", text)
    stats = _parse_servalcat_json(prefix)
    if stats is None:
        raise RuntimeError(f"servalcat failed on {model}:\n{text[-2000:]}")
    stats["wall_s"] = wall
    del rw
    return stats


def _parse_servalcat_json(prefix):
    js = Path(str(prefix) + "_stats.json")
    if not js.exists():
        return None
    stats = json.loads(js.read_text())
    last = stats[-1]
    s = last["data"]["summary"]
    geom = last.get("geom", {}).get("summary", {}).get("r.m.s.d.", {})
    return {"r_work": s.get("R1work", s.get("Rwork")), "r_free": s.get("R1free", s.get("Rfree")),
            "rms_bond": geom.get("Bond distances, non H"), "rms_angle": geom.get("Bond angles, non H")}


def run_jaxrefine(model, pid, out_dir, cycles):
    from jaxrefine.config import load_config
    from jaxrefine.refine.run import run_refinement

    _, data = paths(pid)
    cfg = load_config(None, [f"refine.n_cycles={cycles}", f"model.monlib={DATA / 'monomers'}", f"data.labin={LABIN[pid]}"])
    t = time.perf_counter()
    m = run_refinement(model, data, out_dir, cfg)
    return m, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="*", default=list(ORDER))
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--servalcat", default=shutil.which("servalcat"))
    ap.add_argument("--torchref", default=shutil.which("torchref.refine"))
    ap.add_argument("--no-servalcat-refine", action="store_true", help="only score jaxrefine's models with servalcat")
    args = ap.parse_args(argv)
    rows = []
    work = tempfile.mkdtemp(prefix="jaxrefine-bench-")
    for pid in args.datasets:
        shaken = make_shaken(pid, work)
        m, wall = run_jaxrefine(shaken, pid, Path(work) / f"jr_{pid}", args.cycles)
        row = {"pdb": pid, "jr_own": (m["r_work"], m["r_free"]), "jr_bond": m["rms_bond"], "jr_angle": m["rms_angle"], "jr_wall": wall}
        if args.servalcat:
            sc = servalcat_score(args.servalcat, Path(work) / f"jr_{pid}" / "refined.pdb", pid, work, 0)
            row["jr_scored"] = (sc["r_work"], sc["r_free"])
            if not args.no_servalcat_refine:
                sv = servalcat_score(args.servalcat, shaken, pid, work, args.cycles)
                row["sv"] = (sv["r_work"], sv["r_free"])
                row["sv_bond"], row["sv_angle"], row["sv_wall"] = sv["rms_bond"], sv["rms_angle"], sv["wall_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print("| PDB | jaxrefine R-work/R-free (servalcat scoring) | jaxrefine own | RMS bond / angle | wall s | "
          "servalcat R-work/R-free | servalcat RMS bond / angle | servalcat wall s | time ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda t: f"{t[0]:.3f} / {t[1]:.3f}" if t else "–"  # noqa: E731
        ratio = f"{r['sv_wall'] / r['jr_wall']:.2f}×" if r.get("sv_wall") else "–"
        svg = f"{r['sv_bond']:.3f} / {r['sv_angle']:.2f}" if r.get("sv_bond") is not None else "–"
        print(f"| {r['pdb']} | {f(r.get('jr_scored'))} | {f(r['jr_own'])} | {r['jr_bond']:.3f} / {r['jr_angle']:.2f} | "
              f"{r['jr_wall']:.0f} | {f(r.get('sv'))} | {svg} | {r.get('sv_wall', float('nan')):.0f} | {ratio} |")
    (REPO / "benchmarks" / "results_refine.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
