"""jaxrefine vs servalcat on the shared datasets: wall time (cold and warm), peak memory, R-free.

For each dataset the deposited model (hydrogens removed) is shaken as in the shared data README
(0.5 Å RMS, seed 7, B reset to the mean, ANISOU dropped) and refined, in the same run, by

* jaxrefine with its defaults (``jaxrefine refine``, a fresh process each time):
  **cold** = a new, empty compilation cache folder; **warm** = a second process on the same cache;
* servalcat, ``refine_xtal_norefmac --ncycle 10 -s xray --free 0`` (its usual 10 cycles).

Each program's final model is then scored under both yardsticks: servalcat with no refinement
(``--ncycle 0 --adp aniso``, which adds riding hydrogens) and ``jaxrefine rfactors`` (with riding hydrogens
for both models where jaxrefine's refinement used them, ``model.hydrogens: auto`` below 2.5 Å).  Peak memory is the child process's
maximum resident set (``/usr/bin/time -v``, else ``resource.getrusage``).  jaxrefine's own
``timing`` record (metrics.json) gives the split into start, setup, compilation and macrocycles,
and its per-cycle R-free against the running count of F_calc evaluations (the R-free vs
evaluations curve, saved as PNG with ``--plot``).

    python benchmarks/bench_refine.py [--datasets 5e5z 1va7 ...] [--cycles N] [--servalcat-cycles 10]
                                      [--set section.key=value ...] [--out results.json] [--plot curve.png]
                                      [--start shaken|deposited] [--repeat N]

``--repeat N`` runs each timing N times (jaxrefine cold on a fresh cache folder each time, warm, servalcat; in turn)
and reports the medians: a single run on a shared VM swings by ±20 %.

``--start deposited`` re-refines the deposited model instead (hydrogens removed, B and ANISOU kept) and scores
the start too: a re-refinement should end at or below its start's R-free under both yardsticks.

Prints one JSON line per dataset and a markdown table; writes benchmarks/results_refine.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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
GNU_TIME = "/usr/bin/time"
# the goals, as ratios to servalcat measured in the same run
GOAL_COLD, GOAL_WARM, GOAL_RSS = 1.0, 0.3, 2.0


def paths(pid):
    folder = DATA / "xray" / pid
    model = next(p for p in sorted(folder.iterdir()) if ".pdb" in p.name or ".cif" in p.name)
    data = next(p for p in sorted(folder.iterdir()) if ".mtz" in p.name)
    return model, data


def make_shaken(pid, out_dir):
    from jaxrefine.io.model import read_model
    from jaxrefine.io.perturb import shake
    from jaxrefine.io.writers import write_model

    model_path, _ = paths(pid)
    s = shake(read_model(model_path, hydrogens=False), 0.5, seed=7)
    out = Path(out_dir) / f"{pid}_shaken.pdb"
    write_model(s, out, b_iso=s.b_iso)
    return out


def make_deposited(pid, out_dir):
    """The deposited model with its hydrogens removed (coordinates, B and ANISOU as deposited): the start of a
    re-refinement."""
    from jaxrefine.io.model import read_model
    from jaxrefine.io.writers import write_model

    model_path, _ = paths(pid)
    out = Path(out_dir) / f"{pid}_deposited.pdb"
    write_model(read_model(model_path, hydrogens=False), out)
    return out


def measured(cmd, cwd, env=None):
    """Run ``cmd``; (CompletedProcess, wall s, peak RSS GB of the child)."""
    t = time.perf_counter()
    if os.access(GNU_TIME, os.X_OK):
        rss_file = Path(tempfile.mkstemp(prefix="jaxrefine-rss-")[1])
        out = subprocess.run([GNU_TIME, "-f", "%M", "-o", str(rss_file)] + cmd, capture_output=True, text=True,
                             cwd=cwd, env=env)
        wall = time.perf_counter() - t
        try:
            rss = int(rss_file.read_text().split()[-1]) / 1e6  # kB -> GB
        except (ValueError, IndexError):
            rss = float("nan")
        rss_file.unlink()
    else:  # the largest child so far: exact only while each child is larger than the last
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
        wall = time.perf_counter() - t
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    return out, wall, rss


def servalcat(exe, model, pid, work, ncycle, extra=()):
    """servalcat refine_xtal_norefmac: dict of R-work, R-free, RMS bond/angle, wall, RSS, output model."""
    _, data = paths(pid)
    prefix = Path(work) / f"sv_{pid}_{ncycle}_{Path(model).stem.split('.')[0]}"
    cmd = [exe, "refine_xtal_norefmac", "--model", str(model), "--hklin", str(data), "--labin", LABIN[pid],
           "--free", "0", "-s", "xray", "--monlib", str(DATA / "monomers"), "--ncycle", str(ncycle),
           "-o", str(prefix), *extra]
    out, wall, rss = measured(cmd, work)
    stats = _servalcat_stats(prefix)
    if stats is None:
        raise RuntimeError(f"servalcat failed on {model}:\n{(out.stdout + out.stderr)[-2000:]}")
    stats.update(wall_s=wall, rss_gb=rss, model=str(prefix) + ".pdb" if Path(str(prefix) + ".pdb").exists()
                 else str(prefix) + ".mmcif")
    return stats


def _servalcat_stats(prefix):
    js = Path(str(prefix) + "_stats.json")
    if not js.exists():
        return None
    last = json.loads(js.read_text())[-1]
    s = last["data"]["summary"]
    geom = last.get("geom", {}).get("summary", {}).get("r.m.s.d.", {})
    return {"r_work": s.get("R1work", s.get("Rwork")), "r_free": s.get("R1free", s.get("Rfree")),
            "rms_bond": geom.get("Bond distances, non H"), "rms_angle": geom.get("Bond angles, non H")}


def jaxrefine_refine(model, pid, out_dir, cache_dir, cycles, sets):
    """One ``jaxrefine refine`` process; (metrics dict, wall s, peak RSS GB)."""
    _, data = paths(pid)
    cmd = [sys.executable, "-m", "jaxrefine.cli", "refine", str(model), str(data), "--out", str(out_dir),
           "--monlib", str(DATA / "monomers"), "--labin", LABIN[pid], "--set", f"runtime.compilation_cache={cache_dir}"]
    if cycles:
        cmd += ["--cycles", str(cycles)]
    for s in sets:
        cmd += ["--set", s]
    out, wall, rss = measured(cmd, REPO)
    if out.returncode != 0:
        raise RuntimeError(f"jaxrefine refine failed on {pid}:\n{(out.stdout + out.stderr)[-2000:]}")
    return json.loads((Path(out_dir) / "metrics.json").read_text()), wall, rss


def jaxrefine_score(model, pid, hydrogens="remove"):
    """``jaxrefine rfactors --json`` of a model: (R-work, R-free).  ``hydrogens``: what the refinement used
    (metrics.json ``hydrogens.mode``: riding or remove), given to both programs' models alike."""
    _, data = paths(pid)
    out = subprocess.run([sys.executable, "-m", "jaxrefine.cli", "-q", "rfactors", str(model), str(data), "--labin", LABIN[pid],
                          "--hydrogens", hydrogens, "--monlib", str(DATA / "monomers"), "--json"],
                         capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"jaxrefine rfactors failed on {model}:\n{(out.stdout + out.stderr)[-2000:]}")
    js = json.loads(out.stdout[out.stdout.index("{"):])
    return js["r_work"], js["r_free"]


def curve(metrics):
    """[(F_calc evaluations so far, R-free)] per macrocycle from metrics.json's timing record."""
    cycles = metrics.get("cycles", [])
    per = {c.get("cycle"): c for c in (metrics.get("timing") or {}).get("cycles", [])}
    n, out = 0, []
    for c in cycles:
        n += int(per.get(c["cycle"], {}).get("evaluations", 0))
        out.append((n, c["r_free"]))
    return out


def bench_one(pid, args, work):
    start = (make_deposited if args.start == "deposited" else make_shaken)(pid, work)
    cache = Path(work) / f"cache_{pid}"  # fresh: the cold run compiles everything
    row = {"pdb": pid}
    m, row["jr_cold_s"], row["jr_cold_rss_gb"] = jaxrefine_refine(start, pid, Path(work) / f"jr_{pid}", cache, args.cycles, args.set)
    m2, row["jr_warm_s"], row["jr_warm_rss_gb"] = jaxrefine_refine(start, pid, Path(work) / f"jr2_{pid}", cache, args.cycles, args.set)
    row.update(jr_own=(m["r_work"], m["r_free"]), jr_bond=m["rms_bond"], jr_angle=m["rms_angle"],
               jr_cycles=len(m.get("cycles", [])) - 1, jr_timing=m.get("timing"), jr_warm_timing=m2.get("timing"),
               jr_curve=curve(m))
    jr_model = Path(work) / f"jr_{pid}" / "refined.pdb"
    h_mode = "riding" if (m.get("hydrogens") or {}).get("mode") == "riding" else "remove"
    row["jr_hydrogens"] = h_mode
    row["jr_by_jr"] = jaxrefine_score(jr_model, pid, h_mode)
    if args.start == "deposited":  # the start under both yardsticks: a re-refinement should end below it
        row["start_by_jr"] = jaxrefine_score(start, pid, h_mode)
        if args.servalcat:
            sc0 = servalcat(args.servalcat, start, pid, work, 0, ("--adp", "aniso"))
            row["start_by_sv"] = (sc0["r_work"], sc0["r_free"])
    if args.servalcat:
        sc = servalcat(args.servalcat, jr_model, pid, work, 0, ("--adp", "aniso"))
        row["jr_by_sv"] = (sc["r_work"], sc["r_free"])
        sv = servalcat(args.servalcat, start, pid, work, args.servalcat_cycles)
        row.update(sv_own=(sv["r_work"], sv["r_free"]), sv_bond=sv["rms_bond"], sv_angle=sv["rms_angle"],
                   sv_s=sv["wall_s"], sv_rss_gb=sv["rss_gb"])
        row["sv_by_jr"] = jaxrefine_score(sv["model"], pid, h_mode)
        sc2 = servalcat(args.servalcat, sv["model"], pid, work, 0, ("--adp", "aniso"))
        row["sv_by_sv"] = (sc2["r_work"], sc2["r_free"])
    if args.repeat > 1:
        repeat_timings(row, pid, start, args, work)
    return row


def repeat_timings(row, pid, start, args, work):
    """``--repeat N``: N − 1 more cold and warm jaxrefine runs (each cold one on a fresh cache folder) and servalcat
    runs, alternating; the row's wall times and peak RSS become the medians of all N (each run's kept in ``*_runs``).
    The R-factors are the first run's (every run gives the same model)."""
    import statistics

    runs = {k: [row[k]] for k in ("jr_cold_s", "jr_cold_rss_gb", "jr_warm_s", "jr_warm_rss_gb") if k in row}
    if "sv_s" in row:
        runs.update(sv_s=[row["sv_s"]], sv_rss_gb=[row["sv_rss_gb"]])
    for k in range(1, args.repeat):
        cache = Path(work) / f"cache_{pid}_{k}"
        for key, out in (("cold", f"jrc_{pid}_{k}"), ("warm", f"jrw_{pid}_{k}")):
            _, wall, rss = jaxrefine_refine(start, pid, Path(work) / out, cache, args.cycles, args.set)
            runs[f"jr_{key}_s"].append(wall)
            runs[f"jr_{key}_rss_gb"].append(rss)
        if "sv_s" in runs:
            sv = servalcat(args.servalcat, start, pid, work, args.servalcat_cycles)
            runs["sv_s"].append(sv["wall_s"])
            runs["sv_rss_gb"].append(sv["rss_gb"])
    for key, values in runs.items():
        row[key] = statistics.median(values)
        row[key + "_runs"] = values


def table(rows) -> str:
    f2 = lambda t: f"{t[0]:.3f} / {t[1]:.3f}" if t else "–"  # noqa: E731
    lines = [
        "| PDB | jaxrefine cold s | warm s | servalcat s | cold / sv | warm / sv | jaxrefine RSS GB | servalcat RSS GB "
        "| RSS ratio | R-work / R-free, servalcat yardstick: jaxrefine | servalcat | jaxrefine yardstick: jaxrefine "
        "| servalcat | RMS bond / angle: jaxrefine | servalcat | goals (cold ≤ 1, warm ≤ 0.3, RSS ≤ 2) |",
        "|---" * 16 + "|",
    ]
    for r in rows:
        sv = r.get("sv_s")
        cold = r["jr_cold_s"] / sv if sv else float("nan")
        warm = r["jr_warm_s"] / sv if sv else float("nan")
        rss = max(r["jr_cold_rss_gb"], r["jr_warm_rss_gb"]) / r["sv_rss_gb"] if r.get("sv_rss_gb") else float("nan")
        unmet = [name for name, v, goal in (("cold", cold, GOAL_COLD), ("warm", warm, GOAL_WARM), ("RSS", rss, GOAL_RSS))
                 if not v <= goal]
        svg = f"{r['sv_bond']:.3f} / {r['sv_angle']:.2f}" if r.get("sv_bond") is not None else "–"
        lines.append(
            f"| {r['pdb']} | {r['jr_cold_s']:.0f} | {r['jr_warm_s']:.0f} | {sv or float('nan'):.0f} | {cold:.2f} | {warm:.2f} "
            f"| {max(r['jr_cold_rss_gb'], r['jr_warm_rss_gb']):.2f} | {r.get('sv_rss_gb', float('nan')):.2f} | {rss:.1f} "
            f"| {f2(r.get('jr_by_sv'))} | {f2(r.get('sv_by_sv'))} | {f2(r.get('jr_by_jr'))} | {f2(r.get('sv_by_jr'))} "
            f"| {r['jr_bond']:.3f} / {r['jr_angle']:.2f} | {svg} | {'met' if not unmet else 'not met: ' + ', '.join(unmet)} |")
    return "\n".join(lines)


def start_table(rows) -> str:
    """Re-refinement (``--start deposited``): R-free of the start and of each program's final model under both
    yardsticks, and whether each ended at or below its start."""
    f = lambda t: f"{t[1]:.4f}" if t else "–"  # noqa: E731
    lines = ["| PDB | start R-free (servalcat yardstick) | jaxrefine | servalcat | start R-free (jaxrefine yardstick) "
             "| jaxrefine | servalcat | jaxrefine at or below its start (both yardsticks) |", "|---" * 8 + "|"]
    for r in rows:
        below = all(a and b and a[1] <= b[1] + 1e-4 for a, b in ((r.get("jr_by_sv"), r.get("start_by_sv")),
                                                                  (r.get("jr_by_jr"), r.get("start_by_jr"))))
        lines.append(f"| {r['pdb']} | {f(r.get('start_by_sv'))} | {f(r.get('jr_by_sv'))} | {f(r.get('sv_by_sv'))} "
                     f"| {f(r.get('start_by_jr'))} | {f(r.get('jr_by_jr'))} | {f(r.get('sv_by_jr'))} | {'yes' if below else 'no'} |")
    return "\n".join(lines)


def timing_table(rows) -> str:
    """Where jaxrefine's cold and warm wall time goes (metrics.json ``timing``)."""
    lines = ["| PDB | run | start+read s | setup s | compile s | macrocycles s | optimiser s | F evaluations | host updates s |",
             "|---" * 9 + "|"]
    for r in rows:
        for name, t in (("cold", r.get("jr_timing")), ("warm", r.get("jr_warm_timing"))):
            if not t:
                continue
            cyc = t.get("cycles", [])
            host = sum(sum(v for k, v in c.get("host_s", {}).items()) for c in cyc)
            lines.append(f"| {r['pdb']} | {name} | {t.get('start_s', 0.0) + t.get('read_s', 0.0):.1f} | {t.get('setup_s', float('nan')):.1f} "
                         f"| {t.get('compile_s', float('nan')):.1f} | {sum(c.get('wall_s', 0) for c in cyc):.1f} "
                         f"| {sum(c.get('optimise_s', 0) for c in cyc):.1f} | {sum(c.get('evaluations', 0) for c in cyc)} "
                         f"| {host:.1f} |")
    return "\n".join(lines)


def plot_curves(rows, path):
    from jaxrefine.io.figures import new_figure, save_png

    fig = new_figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for r in rows:
        pts = r.get("jr_curve") or []
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=r["pdb"])
            if r.get("sv_own"):
                ax.axhline(r["sv_own"][1], ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xlabel("F_calc evaluations (jaxrefine, cumulative)")
    ax.set_ylabel("R-free (jaxrefine's own)")
    ax.set_title("R-free vs evaluations; dotted: servalcat's final R-free")
    ax.legend(fontsize=7)
    save_png(fig, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="*", default=list(ORDER), choices=ORDER)
    ap.add_argument("--cycles", type=int, default=None, help="jaxrefine macrocycles (default: its config's)")
    ap.add_argument("--servalcat-cycles", type=int, default=10)
    ap.add_argument("--servalcat", default=shutil.which("servalcat"), help="servalcat executable (else none: jaxrefine only)")
    ap.add_argument("--set", action="append", default=[], help="extra jaxrefine --set overrides")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results_refine.json"))
    ap.add_argument("--plot", help="PNG of R-free vs F_calc evaluations")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each timing (cold, warm, servalcat), alternating; the table shows their medians")
    ap.add_argument("--start", choices=("shaken", "deposited"), default="shaken",
                    help="shaken (0.5 Å, B reset: the speed and quality benchmark) or deposited (a re-refinement)")
    args = ap.parse_args(argv)
    rows = []
    work = tempfile.mkdtemp(prefix="jaxrefine-bench-")
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for pid in args.datasets:
        rows.append(bench_one(pid, args, work))
        print(json.dumps({k: v for k, v in rows[-1].items() if "timing" not in k and k != "jr_curve"}), flush=True)
        Path(args.out).write_text(json.dumps({"started": started, "start": args.start, "machine": platform.processor() or platform.machine(),
                                              "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "rows": rows}, indent=1))
    print()
    print(table(rows))
    print()
    if args.start == "deposited":
        print(start_table(rows))
        print()
    print(timing_table(rows))
    if args.plot:
        plot_curves(rows, args.plot)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
