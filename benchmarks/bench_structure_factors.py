"""Benchmark: F_calc and F_calc + gradient (FFT) against gemmi's DensityCalculatorX + FFT and a
direct summation, on real models expanded to P1 (and tiled for the large sizes).

    .venv/bin/python benchmarks/bench_structure_factors.py [--large] [--dtype float32 float64]

Prints one markdown table row per (model, d_min, dtype): jit-compiled run times (best of
--repeat), compile time, the ratio to gemmi measured in the same run, the direct summation
(timed on a subset of reflections and scaled to all), and the compiled buffer memory of the
F + gradient function (XLA memory analysis).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import gemmi
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

from jaxrefine.core.crystal import Crystal, orth_matrix  # noqa: E402
from jaxrefine.io.formfactor_io import it92_form_factors  # noqa: E402
from jaxrefine.io.miller_io import unique_miller_indices  # noqa: E402
from jaxrefine.io.model import read_model  # noqa: E402
from jaxrefine.xray.structure_factors import make_sf_setup, structure_factors  # noqa: E402

DATA = Path(os.environ.get("JAXREFINE_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "xray"


def p1_crystal(cell) -> Crystal:
    orth = orth_matrix(cell)
    return Crystal(
        cell=np.asarray(cell, float), space_group="P 1", sg_number=1, rot=np.eye(3)[None], trans=np.zeros((1, 3)),
        n_primitive_ops=1, orth=orth, frac=np.linalg.inv(orth),
    )


def expand_p1(model, tiles=(1, 1, 1), expand=True):
    """(crystal, xyz_frac, b, occ, element) of a model: all symmetry copies in P1, tiled."""
    cr = model.crystal
    x = model.xyz_frac
    if expand:
        x = np.concatenate([x @ r.T + t for r, t in zip(cr.rot, cr.trans)])
    n_copy = len(x) // model.n_atoms
    b, q, el = (np.tile(v, n_copy) for v in (model.b_iso, model.occ, model.element))
    x = x - np.floor(x)
    shifts = np.array([(i, j, k) for i in range(tiles[0]) for j in range(tiles[1]) for k in range(tiles[2])], float)
    x = np.concatenate([(x + s) / np.asarray(tiles, float) for s in shifts])
    b, q, el = (np.tile(v, len(shifts)) for v in (b, q, el))
    cell = np.asarray(cr.cell, float).copy()
    cell[:3] *= tiles
    return p1_crystal(cell), x, b, q, el


def gemmi_structure(crystal, xyz_frac, b, q, el):
    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(*crystal.cell)
    st.spacegroup_hm = "P 1"
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    xyz = xyz_frac @ crystal.orth.T
    for start in range(0, len(xyz), 100):
        res = gemmi.Residue()
        res.name = "UNK"
        res.seqid = gemmi.SeqId(start // 100 + 1, " ")
        for i in range(start, min(start + 100, len(xyz))):
            a = gemmi.Atom()
            a.name = el[i]
            a.element = gemmi.Element(el[i])
            a.pos = gemmi.Position(*xyz[i])
            a.b_iso = float(b[i])
            a.occ = float(q[i])
            res.add_atom(a)
        chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    st.setup_cell_images()
    return st


def native_structure(path):
    st = gemmi.read_structure(str(path))
    st.remove_hydrogens()
    st.setup_cell_images()
    return st


def best_of(fn, repeat):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return min(ts)


def gemmi_fcalc_time(st, d_min, repeat):
    dc = gemmi.DensityCalculatorX()
    dc.d_min = d_min
    dc.rate = 1.5
    dc.set_refmac_compatible_blur(st[0])
    dc.grid.setup_from(st)

    def run():
        dc.put_model_density_on_grid(st[0])
        asu = gemmi.transform_map_to_f_phi(dc.grid, half_l=True).prepare_asu_data(dmin=d_min)
        return asu.value_array

    return best_of(run, repeat)


def bench_case(name, case, d_min, dtype, repeat, n_direct, native=None):
    crystal, x, b, q, el = case
    hkl = unique_miller_indices(crystal, d_min)
    ff = it92_form_factors(el)
    setup = make_sf_setup(crystal, hkl, ff, "fft", d_min=d_min, b_iso=b, dtype=dtype)
    xj, bj, qj = (jnp.asarray(v, dtype) for v in (x, b, q))
    f_obs = jnp.abs(structure_factors(xj, bj, qj, setup)) * 1.05

    def target(x, b, q, setup, f_obs):
        return jnp.sum((jnp.abs(structure_factors(x, b, q, setup)) - f_obs) ** 2)

    row = {"model": name, "atoms": len(x), "d_min": d_min, "dtype": jnp.dtype(dtype).name, "n_refl": len(hkl)}
    row["grid"] = "x".join(map(str, setup.meta.grid_shape))
    fc = jax.jit(structure_factors)
    vg = jax.jit(jax.value_and_grad(target, argnums=(0, 1, 2)))
    t0 = time.perf_counter()
    jax.block_until_ready(fc(xj, bj, qj, setup))
    first_f = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(vg(xj, bj, qj, setup, f_obs))
    first_g = time.perf_counter() - t0
    row["t_f"] = best_of(lambda: fc(xj, bj, qj, setup), repeat)
    row["t_fg"] = best_of(lambda: vg(xj, bj, qj, setup, f_obs), repeat)
    row["compile"] = first_f - row["t_f"] + first_g - row["t_fg"]
    mem = vg.lower(xj, bj, qj, setup, f_obs).compile().memory_analysis()
    row["mem_gb"] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 1e9
    st = gemmi_structure(crystal, x, b, q, el) if crystal.n_ops == 1 else native
    row["t_gemmi"] = gemmi_fcalc_time(st, d_min, repeat)
    # the same atoms given to gemmi in their own space group (it spreads the ASU and symmetrises)
    row["t_gemmi_native"] = gemmi_fcalc_time(native, d_min, repeat) if native is not None else float("nan")
    # direct summation on a subset, scaled to all reflections
    sub = hkl[np.random.default_rng(0).choice(len(hkl), min(n_direct, len(hkl)), replace=False)]
    direct = make_sf_setup(crystal, sub, ff, "direct", dtype=dtype)
    jax.block_until_ready(fc(xj, bj, qj, direct))
    row["t_direct"] = best_of(lambda: fc(xj, bj, qj, direct), 1) * len(hkl) / len(sub)
    return row


HEADER = (
    "| model | atoms | d_min Å | dtype | reflections | grid | F ms | F+grad ms | compile s | gemmi F ms "
    "| F / gemmi | F+grad / gemmi | gemmi native SG ms | direct F s (est.) | direct / F | F+grad buffers GB |"
)


def fmt(r):
    return (
        f"| {r['model']} | {r['atoms']} | {r['d_min']:.1f} | {r['dtype']} | {r['n_refl']} | {r['grid']} "
        f"| {r['t_f'] * 1e3:.0f} | {r['t_fg'] * 1e3:.0f} | {r['compile']:.1f} | {r['t_gemmi'] * 1e3:.0f} "
        f"| {r['t_f'] / r['t_gemmi']:.1f} | {r['t_fg'] / r['t_gemmi']:.1f} | {r['t_gemmi_native'] * 1e3:.0f} "
        f"| {r['t_direct']:.1f} "
        f"| {r['t_direct'] / r['t_f']:.0f} | {r['mem_gb']:.2f} |"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--large", action="store_true", help="include the ~59k-atom case (4iid in P1)")
    p.add_argument("--dtype", nargs="+", default=["float32", "float64"])
    p.add_argument("--d-min", nargs="+", type=float, default=[2.0, 1.5])
    p.add_argument("--sizes", nargs="+", default=["1k", "5k", "5k-sg", "20k"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--n-direct", type=int, default=300, help="reflections timed by direct summation")
    args = p.parse_args(argv)

    l2h = read_model(DATA / "1l2h" / "1l2h.cif.gz", hydrogens=False)
    l2h_native = native_structure(DATA / "1l2h" / "1l2h.cif.gz")
    cases = {
        "1k": ("1l2h ASU in P1", lambda: expand_p1(l2h, expand=False), None),
        "5k": ("1l2h P1", lambda: expand_p1(l2h), l2h_native),
        "20k": ("1l2h P1 2x2x1", lambda: expand_p1(l2h, tiles=(2, 2, 1)), None),
        # the same 5k-atom cell in its own space group: 1294 ASU atoms, P 43
        "5k-sg": ("1l2h P 43 (5176 in cell)", lambda: (l2h.crystal, l2h.xyz_frac, l2h.b_iso, l2h.occ, l2h.element), l2h_native),
    }
    sizes = list(args.sizes)
    if args.large or "50k" in sizes:
        iid = read_model(DATA / "4iid" / "4iid.pdb.gz", hydrogens=False)
        cases["50k"] = ("4iid P1", lambda: expand_p1(iid), native_structure(DATA / "4iid" / "4iid.pdb.gz"))
        if "50k" not in sizes:
            sizes.append("50k")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, "
          f"gemmi {gemmi.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1), flush=True)
    for size in sizes:
        name, make, native = cases[size]
        case = make()
        for d_min in args.d_min:
            for dt in args.dtype:
                row = bench_case(name, case, d_min, getattr(jnp, dt), args.repeat, args.n_direct, native)
                print(fmt(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
