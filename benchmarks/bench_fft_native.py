"""F and F+gradient time of the FFT structure factors on the shared models in their own space groups.

    python benchmarks/bench_fft_native.py [--datasets 5orl 1l2h 4iid] [--dtype float32]

For each dataset: all unique reflections to the data's resolution, IT92 form factors, isotropic B;
``structure_factors`` and the value and gradient (xyz, B, occ) of a least-squares amplitude target,
jit-compiled, best of 5 with ``block_until_ready``; XLA's buffer sizes of the compiled F+grad; and
the amplitude error against direct summation on 300 random reflections.  Used for issue 15's
one-grid spreading (5orl has 8 scattering types: one FFT instead of eight).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("JAXREFINE_DATA", REPO.parent / "shared" / "data"))

from jaxrefine.io.formfactor_io import it92_form_factors  # noqa: E402
from jaxrefine.io.miller_io import unique_miller_indices  # noqa: E402
from jaxrefine.io.model import read_model  # noqa: E402
from jaxrefine.xray.structure_factors import make_sf_setup, structure_factors  # noqa: E402

D_MIN = {"5e5z": 1.66, "4xof": 1.15, "1l2h": 1.54, "5orl": 1.69, "4iid": 2.3, "1va7": 2.9, "5kzb": 3.0}


def best_of(fn, repeat=5):
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return min(ts)


def bench(pdb, dtype):
    folder = DATA / "xray" / pdb
    m = read_model(next(p for p in sorted(folder.iterdir()) if ".pdb" in p.name or ".cif" in p.name), hydrogens=False)
    crystal, d_min = m.crystal, D_MIN[pdb]
    x = np.asarray(m.xyz_cart) @ np.asarray(crystal.frac).T
    hkl = unique_miller_indices(crystal, d_min)
    ff = it92_form_factors(m.element)
    setup = make_sf_setup(crystal, hkl, ff, "fft", d_min=d_min, b_iso=m.b_iso, dtype=dtype)
    xj, bj, qj = (jnp.asarray(v, dtype) for v in (x, m.b_iso, m.occ))
    fc = jax.jit(structure_factors)
    f_obs = jnp.abs(fc(xj, bj, qj, setup)) * 1.05

    def target(x, b, q, setup, f_obs):
        return jnp.sum((jnp.abs(structure_factors(x, b, q, setup)) - f_obs) ** 2)

    vg = jax.jit(jax.value_and_grad(target, argnums=(0, 1, 2)))
    jax.block_until_ready(vg(xj, bj, qj, setup, f_obs))
    t_f = best_of(lambda: fc(xj, bj, qj, setup))
    t_fg = best_of(lambda: vg(xj, bj, qj, setup, f_obs))
    mem = vg.lower(xj, bj, qj, setup, f_obs).compile().memory_analysis()
    gb = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 1e9
    sub = hkl[np.random.default_rng(0).choice(len(hkl), min(300, len(hkl)), replace=False)]
    a = np.asarray(fc(xj, bj, qj, make_sf_setup(crystal, sub, ff, "fft", d_min=d_min, b_iso=m.b_iso, dtype=dtype)))
    b = np.asarray(fc(xj, bj, qj, make_sf_setup(crystal, sub, ff, "direct", dtype=dtype)))
    err = np.abs(np.abs(a) - np.abs(b)).sum() / np.abs(b).sum()
    grid = "x".join(map(str, setup.meta.grid_shape))
    print(f"| {pdb} | {len(x)} | {len(ff.a)} | {len(hkl)} | {grid} | {1e3 * t_f:.0f} | {1e3 * t_fg:.0f} | {gb:.2f} | {err:.1e} |",
          flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="*", default=["5orl", "1l2h", "4iid"], choices=sorted(D_MIN))
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    print("| PDB | atoms | types | reflections | grid | F ms | F+grad ms | F+grad buffers GB | FFT vs direct R |")
    print("|---|---|---|---|---|---|---|---|---|")
    for pdb in args.datasets:
        bench(pdb, jnp.dtype(args.dtype))


if __name__ == "__main__":
    main()
