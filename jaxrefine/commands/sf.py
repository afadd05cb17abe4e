"""``jaxrefine sf MODEL --d-min D [--method fft|direct] [--hydrogens keep|remove] --out FC.mtz``."""
from __future__ import annotations

import logging
import time

from . import number_at_least

HELP = (
    "Compute F_calc (IT92 X-ray form factors, isotropic B and ANISOU, all symmetry operators) for all "
    "unique reflections to --d-min and write FC/PHIC to an MTZ file."
)

log = logging.getLogger(__name__)
MIN_D = 0.3  # Å: no X-ray experiment reaches further (and the reflection list would not fit in memory)


def add_arguments(p):
    p.add_argument("model", help="model file (PDB or mmCIF, .gz allowed)")
    p.add_argument("--d-min", type=number_at_least(MIN_D, "Å"), required=True, help="high-resolution limit (Å)")
    p.add_argument("--d-max", type=number_at_least(0.0, "Å"), default=0.0, help="low-resolution limit (Å); default none")
    p.add_argument("--method", choices=("fft", "direct"), default="fft", help="FFT (default) or exact direct summation")
    p.add_argument("--hydrogens", choices=("keep", "remove"), default="keep", help="keep or remove hydrogens")
    p.add_argument("--table", choices=("it92", "electron", "neutron"), default="it92", help="form-factor table")
    p.add_argument("--out", required=True, help="output MTZ (written atomically; never an input)")


def compute_fcalc(model, d_min: float, d_max: float = 0.0, method: str = "fft", table: str = "it92"):
    """(hkl (n, 3) int, F_calc (n,) complex) of a model for its unique reflections d_min <= d <= d_max."""
    import jax.numpy as jnp
    import numpy as np

    from ..io.formfactor_io import form_factors
    from ..io.miller_io import unique_miller_indices
    from ..xray.structure_factors import make_sf_setup, split_adp, structure_factors_jit

    hkl = unique_miller_indices(model.crystal, d_min, d_max)
    ff = form_factors(model.element, table, model.source)
    b_iso, u_aniso = split_adp(model.b_iso, model.u_aniso, model.has_aniso)
    use_u = bool(np.any(model.has_aniso))
    setup = make_sf_setup(model.crystal, hkl, ff, method=method, d_min=d_min, b_iso=b_iso, u_aniso=u_aniso if use_u else None)
    f = structure_factors_jit(
        jnp.asarray(model.xyz_frac), jnp.asarray(b_iso), jnp.asarray(model.occ), setup, jnp.asarray(u_aniso) if use_u else None
    )
    return hkl, np.asarray(f)


def run(args) -> int:
    from ..io.model import read_model
    from ..errors import InputError
    from ..io.writers import check_not_input, protect, write_mtz

    protect(args.model)
    check_not_input(args.out)
    if args.d_max and args.d_max <= args.d_min:
        raise InputError(f"--d-max {args.d_max:g}: must be larger than --d-min {args.d_min:g} (Å)")
    model = read_model(args.model, hydrogens=args.hydrogens == "keep")
    t0 = time.perf_counter()
    hkl, f = compute_fcalc(model, args.d_min, args.d_max, args.method, args.table)
    log.info("%d atoms, %d reflections to %.2f Å, method %s: %.2f s", model.n_atoms, len(hkl), args.d_min, args.method, time.perf_counter() - t0)
    write_mtz(args.out, model.crystal, hkl, {"FC/PHIC": ("FP", f)}, title=f"jaxrefine sf {args.method}")
    print(f"wrote {args.out}: {len(hkl)} reflections, FC/PHIC ({args.method})")
    return 0
