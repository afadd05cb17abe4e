"""A simulated fragment screen refined as a fleet, one process at a time, and by servalcat.

One shared model (--pdb, 5e5z by default, without its water, shaken by 0.3 Å: the "apo" starting model of every
entry) and N datasets made from it: |F_calc + k_sol F_mask| of the deposited model (water present
in even entries: the "bound" datasets; absent in odd ones), each with its own coordinate jitter
(0.05 Å), B offset (±2 Å²) and noise (2-8 % of F), on the hkl list and free flags of 5e5z, each entry
missing up to 3 % of the reflections at random (its own reflection list, as a real screen's crystals), with its
own cell (each length within ±--cell-spread, β within ±0.2°; fractional coordinates kept) and resolution (cut at
up to --d-spread beyond 5e5z's d_min).  The entries are laid out as ``screen/<id>/model.pdb`` + ``data.mtz``, i.e.
the folder-pattern manifest.

Measured in the same run (entries per hour on this machine; wall time from start to last result):

* fleet: ``jaxrefine.fleet.refine_many`` on a LocalCluster of --workers processes, a fresh
  compilation cache (the first entries compile, the rest reuse); with --no-shared-layout the same once more with
  ``runtime.grid_steps=0`` and ``runtime.cell_range=[]`` (each entry's FFT layout made for its own cell and d_min);
* sequential: ``jaxrefine refine`` processes one after another (fresh cache: the first compiles, the
  rest load from the persistent cache); --sequential of them, extrapolated to N as
  first + (N-1) × mean(rest);
* servalcat ``refine_xtal_norefmac`` one at a time, --servalcat-entries of them, same number of cycles;
* the vmap prototype (a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``):
  the engine's energy and gradient for a batch of B entries (parameters, data, X-ray state stacked)
  in one ``jax.vmap``ped call, on one device and sharded over 4 host devices with
  ``jax.sharding``, against B calls of the single-entry function.

    python benchmarks/bench_fleet.py [--entries 20] [--workers 2] [--cycles 3] [--sequential 4]
                                     [--servalcat-entries 4] [--batch 8] [--out DIR] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JAXREFINE_DATA", REPO.parent / "shared" / "data"))
# the shared dataset a screen is made from (--pdb): its amplitude and free-flag columns (the screen's data.mtz
# always carries FP, SIGFP and FREE, the flags' values copied)
SOURCES = {"5e5z": ("FP", "FREE"), "1va7": ("FOBS", "R-free-flags"), "5kzb": ("FOBS", "R-free-flags")}


def _source(pdb: str):
    """(model path, MTZ path, amplitude label, free-flag label) of a shared dataset."""
    folder = DATA / "xray" / pdb
    return (next(folder.glob(f"{pdb}.pdb*")), next(folder.glob(f"{pdb}.mtz*"))) + SOURCES[pdb]
K_SOL, B_SOL = 0.35, 46.0  # typical bulk solvent (Fokine & Urzhumtsev 2002)
COMPILED_S = 1.0  # an entry with more tracing+compiling than this compiled programs of its own (a load is ~0.1 s)


# ----------------------------------------------------------------------------- the screen
def _f_model(st, hkl, d_min):
    """|F_calc + k_sol exp(-B_sol s²/4) F_mask| at hkl (gemmi: direct sum, REFMAC-radii flat mask)."""
    import gemmi

    calc = gemmi.StructureFactorCalculatorX(st.cell)
    f_calc = np.array([calc.calculate_sf_from_model(st[0], [int(i) for i in h]) for h in hkl])
    grid = gemmi.FloatGrid()
    grid.setup_from(st, spacing=min(0.4, d_min / 4))
    masker = gemmi.SolventMasker(gemmi.AtomicRadiiSet.Refmac)
    masker.put_mask_on_float_grid(grid, st[0])
    f_mask = np.array(gemmi.transform_map_to_f_phi(grid).get_value_by_hkl(hkl.astype(np.int32))) * grid.unit_cell.volume / grid.point_count
    s2 = np.array([st.cell.calculate_1_d2([int(i) for i in h]) for h in hkl])
    return np.abs(f_calc + K_SOL * np.exp(-B_SOL * s2 / 4) * f_mask)


def _with_cell(st, cell):
    """The structure in ``cell``, its fractional coordinates kept."""
    import gemmi

    old = st.cell
    new = gemmi.UnitCell(*cell)
    for atom in (a for ch in st[0] for r in ch for a in r):
        atom.pos = new.orthogonalize(old.fractionalize(atom.pos))
    st.cell = new
    st.setup_cell_images()
    return st


def make_screen(root: Path, n: int, seed: int = 0, drop: float = 0.03, cell_spread: float = 0.0,
                d_spread: float = 0.0, pdb: str = "5e5z") -> Path:
    """Write ``root/screen/eNN/{model.pdb,data.mtz}``; returns the folder pattern's parent.  Each entry's data lack
    a random fraction (up to ``drop``) of the reflections, as crystals of a screen differ in completeness; its cell
    lengths differ by up to ``cell_spread`` (relative) and β by up to 0.2° (fractional coordinates kept), and its data
    stop at d_min × (1 + up to ``d_spread``)."""
    import gemmi

    rng = np.random.default_rng(seed)
    model_path, mtz_path, f_label, free_label = _source(pdb)
    mtz = gemmi.read_mtz_file(str(mtz_path))
    hkl = np.array(mtz.make_miller_array(), int)
    fp = np.array(mtz.column_with_label(f_label), float)
    free = np.array(mtz.column_with_label(free_label), float)
    keep = np.isfinite(fp)
    hkl, free = hkl[keep], free[keep]
    d_min = float(min(mtz.cell.calculate_d(list(h)) for h in hkl))
    deposited = gemmi.read_structure(str(model_path))
    deposited.setup_entities()
    apo = deposited.clone()
    apo.remove_waters()
    start = apo.clone()
    for atom in (a for ch in start[0] for r in ch for a in r):
        atom.pos = gemmi.Position(*(np.array(atom.pos.tolist()) + rng.normal(0, 0.3 / np.sqrt(3), 3)))
    screen = root / "screen"
    cell0 = np.array(mtz.cell.parameters)
    for i in range(n):
        st = deposited.clone() if i % 2 == 0 else apo.clone()
        cell = cell0 * np.r_[1 + rng.uniform(-cell_spread, cell_spread, 3), 1, 1, 1]
        cell[4] += rng.uniform(-0.2, 0.2) if cell_spread else 0.0
        st = _with_cell(st, cell)
        entry_start = _with_cell(start.clone(), cell)
        uc = gemmi.UnitCell(*cell)
        d = np.array([uc.calculate_d(list(h)) for h in hkl])
        d_cut = d.min() * (1 + rng.uniform(0, d_spread))
        db = rng.uniform(-2, 2)
        for atom in (a for ch in st[0] for r in ch for a in r):
            atom.pos = gemmi.Position(*(np.array(atom.pos.tolist()) + rng.normal(0, 0.05 / np.sqrt(3), 3)))
            atom.b_iso = max(atom.b_iso + db, 2.0)
        f = _f_model(st, hkl, d_min)
        sig = rng.uniform(0.02, 0.08) * f + 0.01 * f.mean()
        f_obs = np.abs(f + rng.normal(size=f.shape) * sig)
        rows = rng.random(len(hkl)) >= rng.uniform(0.0, drop)  # this crystal's reflection list
        rows[np.argmin(np.where(d >= d_cut, d, np.inf))] = True  # its highest-resolution reflection kept
        rows &= d >= d_cut
        out = gemmi.Mtz(with_base=True)
        out.cell, out.spacegroup = uc, mtz.spacegroup
        out.add_dataset("screen")
        for label, kind in (("FP", "F"), ("SIGFP", "Q"), ("FREE", "I")):
            out.add_column(label, kind)
        out.set_data(np.column_stack([hkl, f_obs, sig, free])[rows].astype(np.float32))
        folder = screen / f"e{i:02d}{'_bound' if i % 2 == 0 else ''}"
        folder.mkdir(parents=True, exist_ok=True)
        out.write_to_file(str(folder / "data.mtz"))
        entry_start.write_pdb(str(folder / "model.pdb"))
    return screen


# ----------------------------------------------------------------------------- the three ways
def run_fleet(screen: Path, out: Path, workers: int, sets: list) -> dict:
    from jaxrefine.fleet import refine_many

    t = time.perf_counter()
    rows = refine_many(str(screen / "*" / "model.pdb"), out, workers=workers,
                       overrides=sets + [f"runtime.compilation_cache={out}.cache"])
    wall = time.perf_counter() - t
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        raise RuntimeError(f"fleet entry {failed[0]['id']} failed: {failed[0]['error']}")
    return {"wall_s": wall, "n": len(rows), "per_entry_s": [r["wall_s"] for r in rows],
            "compile_s": [r["compile_s"] for r in rows], "r_free": [r["r_free"] for r in rows],
            "r_free_in": [r["r_free_in"] for r in rows], "kept_input": sum(r["status"] == "kept input" for r in rows)}


def run_sequential(screen: Path, out: Path, count: int, sets: list) -> dict:
    times, r_free = [], []
    for folder in sorted(screen.iterdir())[:count]:
        cmd = [sys.executable, "-m", "jaxrefine.cli", "-q", "refine", str(folder / "model.pdb"), str(folder / "data.mtz"),
               "--out", str(out / folder.name)] + [a for s in sets + [f"runtime.compilation_cache={out}.cache"]
                                                   for a in ("--set", s)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - t)
        if proc.returncode:
            raise RuntimeError(f"jaxrefine refine failed on {folder}: {proc.stderr[-1500:]}")
        r_free.append(json.loads((out / folder.name / "metrics.json").read_text())["r_free"])
    return {"times_s": times, "r_free": r_free}


def run_servalcat(screen: Path, out: Path, count: int, cycles: int, servalcat: str) -> dict:
    times, r_free = [], []
    out.mkdir(parents=True, exist_ok=True)
    for folder in sorted(screen.iterdir())[:count]:
        prefix = out / folder.name
        cmd = [servalcat, "refine_xtal_norefmac", "--model", str(folder / "model.pdb"), "--hklin", str(folder / "data.mtz"),
               "--labin", "FP,SIGFP,FREE", "--free", "0", "-s", "xray", "--monlib", str(DATA / "monomers"),
               "--ncycle", str(cycles), "-o", str(prefix)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
        times.append(time.perf_counter() - t)
        stats = Path(f"{prefix}_stats.json")
        if proc.returncode or not stats.exists():
            raise RuntimeError(f"servalcat failed on {folder}: {(proc.stdout + proc.stderr)[-1500:]}")
        s = json.loads(stats.read_text())[-1]["data"]["summary"]
        r_free.append(s.get("R1free", s.get("Rfree")))
    return {"times_s": times, "r_free": r_free}


# ----------------------------------------------------------------------------- vmap prototype
def vmap_prototype(screen: Path, batch: int, sets: list, repeats: int = 5) -> dict:
    """Energy + gradient of ``batch`` entries: B single calls vs one vmapped call (1 device, 4 devices)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import jaxrefine as jr
    from jaxrefine.config import config_from_dict, config_to_dict
    from jaxrefine.fleet.driver import entry_configs
    from jaxrefine.fleet.manifest import Entry

    # each entry's configuration as refine_many makes it (the fleet's grid steps, its crystal form's cell range), and
    # the first `batch` entries whose problems have the first one's shapes (a batch is one shape)
    entries = [Entry(id=f.name, model=str(f / "model.pdb"), data=str(f / "data.mtz")) for f in sorted(screen.iterdir())]
    base = config_to_dict(jr.load_config(None, sets))
    configs = entry_configs(entries, base)
    setups, shape = [], None
    for e in entries:
        s = jr.build_setup(e.model, e.data, config_from_dict(configs.get(e.id, base)))
        this = jax.tree_util.tree_structure((s.params, s.problem, s.state)), [
            (x.shape, x.dtype) for x in jax.tree_util.tree_leaves((s.params, s.problem, s.state))]
        shape = this if shape is None else shape
        if this == shape:
            setups.append(s)
        if len(setups) == batch:
            break
    args = [(s.params, s.problem, s.state) for s in setups]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *args)

    single = jax.jit(jax.value_and_grad(jr.total_energy))
    batched = jax.jit(jax.vmap(jax.value_and_grad(jr.total_energy)))

    def timed(fn, *a):
        t = time.perf_counter()
        jax.block_until_ready(fn(*a))
        first = time.perf_counter() - t
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            runs.append(time.perf_counter() - t)
        return min(runs), first - min(runs)

    def all_single():
        return [single(*a) for a in args]

    t_single, c_single = timed(all_single)
    t_vmap1, c_vmap1 = timed(batched, *stacked)
    n_dev = len(jax.devices())
    mesh = Mesh(np.array(jax.devices()), ("batch",))  # automatic (not explicit) sharding of the rest
    sharded = jax.device_put(stacked, NamedSharding(mesh, PartitionSpec("batch")))
    t_vmap4, c_vmap4 = timed(batched, *sharded)
    # the same numbers: the batched gradient of entry 0 equals its single gradient
    e1, g1 = single(*args[0])
    eb, gb = batched(*sharded)
    rel = abs(float(eb[0]) - float(e1)) / abs(float(e1))  # on the host: eb lives on the mesh, e1 on one device
    return {"batch": len(setups), "devices": n_dev, "n_atoms": int(setups[0].model.n_atoms), "n_refl": int(setups[0].refl.n),
            "single_s": t_single, "vmap_1dev_s": t_vmap1, "vmap_sharded_s": t_vmap4,
            "compile_single_s": c_single, "compile_vmap_1dev_s": c_vmap1, "compile_vmap_sharded_s": c_vmap4,
            "energy_rel_diff": rel}


# ----------------------------------------------------------------------------- report
def _rate(seconds_per_entry: float) -> float:
    return 3600.0 / seconds_per_entry


def report(res: dict, n: int) -> str:
    fl, sq, sv = res["fleet"], res.get("sequential"), res.get("servalcat")
    lines = ["| way | entries timed | wall s (N entries) | s / entry | entries / hour | vs one process at a time | median R-free |",
             "|---|---|---|---|---|---|---|"]
    seq_rate = None
    if sq:
        t = sq["times_s"]
        est = t[0] + (n - 1) * statistics.mean(t[1:] or t)
        seq_rate = _rate(est / n)
    fleet_rate = _rate(fl["wall_s"] / fl["n"])
    lines.append(f"| fleet ({res['workers']} workers) | {fl['n']} | {fl['wall_s']:.0f} | {fl['wall_s'] / fl['n']:.1f} | "
                 f"{fleet_rate:.0f} | {fleet_rate / seq_rate:.1f}× | {statistics.median(fl['r_free']):.3f} |"
                 if seq_rate else f"| fleet | {fl['n']} | {fl['wall_s']:.0f} | | {fleet_rate:.0f} | | |")
    if sq:
        t = sq["times_s"]
        lines.append(f"| `jaxrefine refine`, one at a time | {len(t)} (first {t[0]:.0f} s, then {statistics.mean(t[1:] or t):.0f} s) | "
                     f"{n / seq_rate * 3600:.0f} (est.) | {3600 / seq_rate:.1f} | {seq_rate:.0f} | 1.0× | "
                     f"{statistics.median(sq['r_free']):.3f} |")
    if sv:
        t = sv["times_s"]
        rate = _rate(statistics.mean(t))
        lines.append(f"| servalcat, one at a time | {len(t)} | {n * statistics.mean(t):.0f} (est.) | {statistics.mean(t):.1f} | "
                     f"{rate:.0f} | {rate / seq_rate:.1f}× | {statistics.median(sv['r_free']):.3f} |" if seq_rate else "")
    per = fl["per_entry_s"]
    comp = fl["compile_s"]
    lines += ["", f"fleet, time per entry inside the workers: first two {per[0]:.1f} / {per[1]:.1f} s "
              f"(tracing+compiling {comp[0]:.1f} / {comp[1]:.1f} s), the rest median {statistics.median(per[2:]):.1f} s "
              f"(tracing+compiling median {statistics.median(comp[2:]):.2f} s); kept input: {fl['kept_input']}; "
              f"median R-free of the input {statistics.median(fl['r_free_in']):.3f}"]
    for key, label in (("fleet", "shared layouts (the fleet's grid steps and cell ranges)"),
                       ("fleet_own_layout", "each entry's own layout (runtime.grid_steps=0, runtime.cell_range=[])")):
        if key in res:
            r = res[key]
            compiled = sum(c > COMPILED_S for c in r["compile_s"])
            lines.append(f"fleet, {label}: {r['wall_s']:.0f} s for {r['n']}, {compiled} entries compiled "
                         f"(> {COMPILED_S} s of tracing+compiling), {sum(r['compile_s']):.0f} s of compilation in all")
    vm = res.get("vmap")
    if vm:
        lines += ["", f"vmap prototype ({vm['batch']} entries, {vm['n_atoms']} atoms, {vm['n_refl']} reflections; "
                  f"energy+gradient, best of 5):", "",
                  "| way | s per batch | s per entry | vs single calls | compile s |", "|---|---|---|---|---|"]
        for key, label in (("single", f"{vm['batch']} single calls"), ("vmap_1dev", "vmap, 1 device"),
                           ("vmap_sharded", f"vmap, sharded over {vm['devices']} host devices")):
            t = vm[f"{key}_s"]
            lines.append(f"| {label} | {t * 1e3:.1f} ms | {t / vm['batch'] * 1e3:.2f} ms | {vm['single_s'] / t:.2f}× | "
                         f"{vm[f'compile_{key}_s']:.1f} |")
        lines.append(f"\n(energy of entry 0, batched vs single: relative difference {vm['energy_rel_diff']:.1e})")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--sequential", type=int, default=4, help="jaxrefine refine processes timed (extrapolated to --entries)")
    ap.add_argument("--servalcat-entries", type=int, default=4)
    ap.add_argument("--servalcat", default=shutil.which("servalcat"))
    ap.add_argument("--batch", type=int, default=8, help="entries in the vmap prototype (0: skip it)")
    ap.add_argument("--out", help="work folder (default: a temporary one)")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--pdb", default="5e5z", choices=sorted(SOURCES), help="the shared dataset the screen is made from")
    ap.add_argument("--cell-spread", type=float, default=0.004, help="relative spread of the entries' cell lengths")
    ap.add_argument("--d-spread", type=float, default=0.03, help="relative spread of the entries' d_min")
    ap.add_argument("--no-shared-layout", action="store_true",
                    help="also run the fleet with each entry's FFT layout made for its own cell and d_min")
    ap.add_argument("--vmap-only", help=argparse.SUPPRESS)  # internal: the 4-device subprocess
    args = ap.parse_args(argv)
    sets = [f"refine.n_cycles={args.cycles}", f"model.monlib={DATA / 'monomers'}"]  # as servalcat's --monlib
    if args.vmap_only:
        print(json.dumps(vmap_prototype(Path(args.vmap_only), args.batch, sets)))
        return 0
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_fleet_"))
    t = time.perf_counter()
    screen = make_screen(root, args.entries, cell_spread=args.cell_spread, d_spread=args.d_spread, pdb=args.pdb)
    print(f"screen of {args.entries} datasets in {root} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    res = {"pdb": args.pdb, "workers": args.workers, "cycles": args.cycles, "entries": args.entries, "cell_spread": args.cell_spread,
           "d_spread": args.d_spread,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_before": os.getloadavg()}
    res["fleet"] = run_fleet(screen, root / "fleet", args.workers, sets)
    print(f"fleet: {res['fleet']['wall_s']:.0f} s", file=sys.stderr)
    if args.no_shared_layout:
        res["fleet_own_layout"] = run_fleet(screen, root / "fleet_own", args.workers,
                                            sets + ["runtime.grid_steps=0", "runtime.cell_range=[]"])
        print(f"fleet, own layouts: {res['fleet_own_layout']['wall_s']:.0f} s", file=sys.stderr)
    if args.sequential:
        res["sequential"] = run_sequential(screen, root / "sequential", args.sequential, sets)
        print(f"sequential: {res['sequential']['times_s']}", file=sys.stderr)
    if args.servalcat_entries and args.servalcat:
        res["servalcat"] = run_servalcat(screen, root / "servalcat", args.servalcat_entries, args.cycles, args.servalcat)
        print(f"servalcat: {res['servalcat']['times_s']}", file=sys.stderr)
    if args.batch:
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip())
        proc = subprocess.run([sys.executable, __file__, "--vmap-only", str(screen), "--batch", str(args.batch),
                               "--cycles", str(args.cycles)], capture_output=True, text=True, env=env)
        if proc.returncode:  # report what was measured before it
            print(f"vmap prototype failed: {proc.stderr[-2000:]}", file=sys.stderr)
        else:
            res["vmap"] = json.loads(proc.stdout.strip().splitlines()[-1])
    res["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(report(res, args.entries))
    print(f"\n{res['date']}, load average before/after {res['load_before'][0]:.1f} / {res['load_after'][0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
