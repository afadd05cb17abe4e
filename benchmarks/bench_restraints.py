"""E_geometry + gradient, jit-compiled, for ~5k-atom and full models, against gemmi's restraint loop.

For each model: topology (gemmi prepare_topology -> padded arrays), non-bonded list build (with
symmetry), XLA compile time of value_and_grad(geometry_energy), and the median run time of one
evaluation (energy + gradient of all terms, non-bonded with symmetry mates).  The reference is
gemmi's own restraint evaluation for the same topology (energy only, no gradient: a Python loop over
Topo.bonds/angles/torsions/chirs calling calculate_z, plus planes via find_best_plane), timed in
the same run.

    python benchmarks/bench_restraints.py [--repeat 20] [--f32]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import gemmi
import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JAXREFINE_DATA", REPO.parent / "shared" / "data"))
MONLIB = DATA / "monomers"


def model_path(pid):
    folder = DATA / "xray" / pid
    return next(p for p in sorted(folder.iterdir()) if ".pdb" in p.name or ".cif" in p.name)


def cases():
    """(label, Model): 4iid chain A truncated to ~5k atoms, 5orl whole, 4iid whole."""
    from jaxrefine.io.model import read_model

    big = read_model(model_path("4iid"), hydrogens=False)
    ch_a = big.select("chain A") & (big.kind == "protein")
    keep = ch_a & (big.res_index <= big.res_index[np.nonzero(ch_a)[0][4999]])
    yield "4iid chain A, ~5k atoms", big.subset(keep)
    yield "5orl", read_model(model_path("5orl"), hydrogens=False)
    yield "4iid", big


def gemmi_reference(model, repeat=3):
    """Seconds for gemmi to evaluate every restraint (energy only) of the model's topology."""
    st = model.structure.clone()
    lib = gemmi.read_monomer_lib(str(MONLIB), st[0].get_all_residue_names())
    topo = gemmi.prepare_topology(st, lib, h_change=gemmi.HydrogenChange.NoChange)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        e = sum(b.calculate_z() ** 2 for b in topo.bonds)
        e += sum(a.calculate_z() ** 2 for a in topo.angles)
        e += sum(x.calculate_z() ** 2 for x in topo.torsions if x.restr.esd > 0)
        e += sum(c.calculate_z(topo.ideal_chiral_abs_volume(c), 0.2) ** 2 for c in topo.chirs)
        for p in topo.planes:
            coeff = gemmi.find_best_plane(p.atoms)
            e += sum(gemmi.get_distance_from_plane(a.pos, coeff) ** 2 for a in p.atoms) / p.restr.esd**2
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--f32", action="store_true", help="float32 (default float64)")
    args = ap.parse_args(argv)
    jax.config.update("jax_enable_x64", not args.f32)
    dtype = jnp.float32 if args.f32 else jnp.float64

    from jaxrefine.io.topology import build_restraints
    from jaxrefine.problem.neighbours import build_nonbonded
    from jaxrefine.restraints import GeometryWeights, geometry_energy

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{'float32' if args.f32 else 'float64'}, {time.strftime('%Y-%m-%d')}")
    print("| model | atoms | restraints (b/a/t/p/c) | nb pairs | topology s | nb list s | compile s | E+grad ms | gemmi loop ms (E only) | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    fg = jax.jit(jax.value_and_grad(geometry_energy))
    for label, model in cases():
        t = time.perf_counter()
        r = build_restraints(model, MONLIB)
        t_topo = time.perf_counter() - t
        t = time.perf_counter()
        nb = build_nonbonded(model, r)
        t_nb = time.perf_counter() - t
        r, nb = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype) if np.issubdtype(np.asarray(a).dtype, np.floating) else jnp.asarray(a), (r, nb))
        w = GeometryWeights(*(jnp.asarray(1.0, dtype) for _ in GeometryWeights._fields))
        x = jnp.asarray(model.xyz_cart, dtype)
        t = time.perf_counter()
        fg.lower(x, r, nb, w).compile()
        t_compile = time.perf_counter() - t
        jax.block_until_ready(fg(x, r, nb, w))
        runs = []
        for k in range(args.repeat):
            xk = x + 1e-4 * k
            t = time.perf_counter()
            jax.block_until_ready(fg(xk, r, nb, w))
            runs.append(time.perf_counter() - t)
        t_run = statistics.median(runs)
        t_ref = gemmi_reference(model)
        c = r.counts()
        print(f"| {label} | {model.n_atoms} | {c['bond']}/{c['angle']}/{c['torsion']}/{c['plane']}/{c['chiral']} | {nb.n_pairs} | "
              f"{t_topo:.2f} | {t_nb:.2f} | {t_compile:.2f} | {1e3 * t_run:.2f} | {1e3 * t_ref:.1f} | {t_ref / t_run:.0f}x |")


if __name__ == "__main__":
    main()
