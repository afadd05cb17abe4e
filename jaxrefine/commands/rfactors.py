"""``jaxrefine rfactors MODEL DATA [--json] [--mtz-out F] [--map-out PREFIX]``."""
from __future__ import annotations

import json

from . import count, number_at_least, positive_length

HELP = (
    "R-work/R-free of a model as given (no refinement): bulk solvent (k_sol, B_sol), overall and "
    "anisotropic scale fitted on the work set, a per-resolution-bin table, and optionally "
    "sigmaA-weighted 2mFo-DFc / mFo-DFc map coefficients (MTZ) and CCP4 maps."
)


def add_arguments(p):
    p.add_argument("model", help="model file (PDB or mmCIF, .gz allowed)")
    p.add_argument("data", help="reflections (MTZ or structure-factor mmCIF)")
    p.add_argument("--labin", help="column labels, e.g. FP,SIGFP[,FREE] or IMEAN,SIGIMEAN")
    p.add_argument("--free-value", type=count, help="flag value of the free set (auto-detected otherwise)")
    p.add_argument("--d-min", type=positive_length, help="high-resolution limit (Å)")
    p.add_argument("--d-max", type=positive_length, help="low-resolution limit (Å)")
    p.add_argument("--hydrogens", choices=("auto", "keep", "remove", "riding"), default="auto",
                   help="auto (default, as refine's model.hydrogens: the model's own hydrogens if it has any, else "
                        "riding hydrogens from the monomer library below 2.5 Å); keep; remove; riding (replace the "
                        "model's hydrogens by the library's, as servalcat's scoring adds them)")
    p.add_argument("--no-hydrogens", action="store_true", help="drop hydrogen atoms of the model (--hydrogens remove)")
    p.add_argument("--riding-hydrogens", action="store_true", help="--hydrogens riding")
    p.add_argument("--monlib", help="monomer library for riding hydrogens (default $CLIBD_MON, else the built-in protein set)")
    p.add_argument("--no-solvent", action="store_true", help="no bulk-solvent model (k_sol = 0)")
    p.add_argument("--bins", type=number_at_least(1, integer=True), default=10, help="resolution bins in the table (default 10)")
    p.add_argument("--sf-method", default="auto", choices=("auto", "fft", "direct"), help="structure-factor method (auto: direct sum for small problems)")
    p.add_argument("--mtz-out", help="write FP/SIGFP/FREE, FMODEL, 2FOFCWT/PH2FOFCWT, FOFCWT/PHFOFCWT to this MTZ")
    p.add_argument("--map-out", help="write PREFIX_2fofc.ccp4 and PREFIX_fofc.ccp4 maps")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    import numpy as np

    from ..io.model import read_model
    from ..io.reflections import check_compatible, read_reflections
    from ..io.writers import check_not_input, json_safe, protect
    from ..problem.fmodel import compute_fmodel, fmodel_maps, fmodel_statistics

    protect(args.model, args.data)
    for path in ([args.mtz_out] if args.mtz_out else []) + ([f"{args.map_out}_2fofc.ccp4", f"{args.map_out}_fofc.ccp4"] if args.map_out else []):
        check_not_input(path)
    mode = "remove" if args.no_hydrogens else "riding" if args.riding_hydrogens else args.hydrogens
    model = read_model(args.model, hydrogens=mode in ("auto", "keep"))
    refl = read_reflections(args.data, labin=args.labin, free_value=args.free_value, d_min=args.d_min, d_max=args.d_max)
    check_compatible(model.crystal, refl.crystal, args.model, args.data)
    if mode in ("auto", "riding"):
        from ..io.model import model_from_structure
        from ..io.topology import find_monlib
        from ..problem.setup import hydrogens_and_sites

        asked = mode
        (mode, why), sites = hydrogens_and_sites(asked, refl.d_min, model, find_monlib(args.monlib))
        why = why if asked == "auto" else f"--hydrogens {asked}"
        if sites is not None and sites.n:
            # every hydrogen gemmi places (its structure); gemmi gives a rotatable hydroxyl H, which has no fixed
            # position, occupancy 0 (15 of the 726 placed on 4xof)
            model = model_from_structure(sites.structure, source=str(args.model))
    else:
        why = f"--hydrogens {mode}"
    maps = bool(args.mtz_out or args.map_out)
    res = compute_fmodel(model, refl, sf_method=args.sf_method, use_solvent=not args.no_solvent, complete=maps)
    stats = fmodel_statistics(model, refl, n_bins=args.bins, result=res)
    stats["model"], stats["data"] = str(args.model), str(args.data)
    stats["hydrogens"] = {"mode": mode, "reason": why, "n": int(np.sum(model.is_hydrogen))}
    stats["deposited"] = {k: model.meta.get(k) for k in ("r_work", "r_free", "resolution")}
    if args.mtz_out or args.map_out:
        from ..io.maps_io import map_from_coefficients, write_ccp4_map
        from ..io.writers import write_mtz

        hkl, two, diff = fmodel_maps(model, refl, res, sf_method=args.sf_method)
        if args.mtz_out:
            write_mtz(args.mtz_out, refl.crystal, hkl, {"2FOFCWT/PH2FOFCWT": ("FP", two), "FOFCWT/PHFOFCWT": ("FP", diff)})
            stats["mtz_out"] = args.mtz_out
        if args.map_out:
            for name, coef in (("2fofc", two), ("fofc", diff)):
                values = map_from_coefficients(refl.crystal, hkl, coef)
                write_ccp4_map(f"{args.map_out}_{name}.ccp4", refl.crystal, values)
            stats["map_out"] = [f"{args.map_out}_2fofc.ccp4", f"{args.map_out}_fofc.ccp4"]
    if args.json:
        print(json.dumps(json_safe(stats), indent=2))
        return 0
    print(f"model        {args.model}  ({model.n_atoms} atoms; hydrogens: {mode}, {why})")
    print(f"data         {args.data}  ({refl.n} reflections, {refl.d_max:.2f}–{refl.d_min:.2f} Å)")
    print(f"R-work       {stats['r_work']:.4f}   (n_work {stats['n_work']})")
    print(f"R-free       {stats['r_free']:.4f}   (n_free {stats['n_free']})")
    dep = stats["deposited"]
    if dep.get("r_work") is not None:
        print(f"deposited    R-work {dep['r_work']:.4f}  R-free {dep['r_free'] if dep['r_free'] is not None else float('nan'):.4f}")
    print(f"CC(Fo,Fm)    work {stats['cc_work']:.4f}  free {stats['cc_free']:.4f}")
    print(f"k_sol        {stats['k_sol']:.3f}   B_sol {stats['b_sol']:.1f} Å²   (solvent fraction {stats['solvent_fraction']:.3f})")
    b = stats["b_aniso"]
    print(f"k_overall    {stats['k_overall']:.4f}   B_iso {stats['b_iso_overall']:.2f} Å²")
    print("B_aniso      " + " ".join(f"{v:.2f}" for v in b) + "  (B11 B22 B33 B12 B13 B23, Å², trace removed)")
    print(f"R(k|Fc|)     work {stats['r_work_fcalc_best_k']:.4f}  free {stats['r_free_fcalc_best_k']:.4f}  (no solvent, analytic best scale)")
    print(f"{'d_max':>7} {'d_min':>6} {'n_work':>7} {'n_free':>6} {'R-work':>7} {'R-free':>7} {'CC-work':>7}")
    for row in stats["bins"]:
        print(f"{row['d_max']:7.2f} {row['d_min']:6.2f} {row['n_work']:7d} {row['n_free']:6d} {row['r_work']:7.4f} {row['r_free']:7.4f} {row['cc_work']:7.4f}")
    if "mtz_out" in stats:
        print(f"map coefficients -> {stats['mtz_out']}")
    for p in stats.get("map_out", []):
        print(f"map -> {p}")
    return 0
