"""``jaxrefine validate MODEL DATA [--monlib DIR] [--json] [--out DIR]``."""
from __future__ import annotations

import json

from . import count, number_at_least

HELP = ("Per-residue density fit (RSCC, density Z-scores) and register-shift scan of a model as given "
        "(no refinement); --out writes residues.csv, validation.json and rscc.png.")


OUTPUT_FILES = ("residues.csv", "validation.json", "rscc.png")


def add_arguments(p):
    p.add_argument("model", help="model file (PDB or mmCIF)")
    p.add_argument("data", help="reflections (MTZ or structure-factor mmCIF)")
    p.add_argument("--monlib", help="monomer library folder (accepted for symmetry with refine; the scan needs none)")
    p.add_argument("--labin", help="data columns, e.g. FP,SIGFP,FREE")
    p.add_argument("--out", "-o", help="output folder for residues.csv, validation.json, rscc.png")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--window", type=number_at_least(2, integer=True), help="residues per register-scan window (default 9)")
    p.add_argument("--threshold", type=number_at_least(0.0), help="ΔCC above which a window is flagged")
    p.add_argument("--worst", type=count, default=10, help="worst residues listed")


def run(args) -> int:
    import os

    from ..io.model import read_model
    from ..io.reflections import check_compatible, read_reflections
    from ..io.writers import check_output_folder, protect, staged_output, write_json, write_text
    from ..validate import DEFAULT_THRESHOLD, DEFAULT_WINDOW, validate_model
    from ..validate.density import plot_residue_fit, residue_csv

    protect(args.model, args.data)
    if args.out:
        check_output_folder(args.out, OUTPUT_FILES, [args.model, args.data])
    model = read_model(args.model, hydrogens=False)
    refl = read_reflections(args.data, labin=args.labin)
    check_compatible(model.crystal, refl.crystal, args.model, args.data)
    res = validate_model(model, refl, window=args.window or DEFAULT_WINDOW,
                         threshold=DEFAULT_THRESHOLD if args.threshold is None else args.threshold, n_worst=args.worst)
    out = {"model": str(args.model), "data": str(args.data), "summary": res.summary,
           "residues": res.residues, "register_shifts": res.register_shifts, "worst": res.worst}
    if args.out:
        with staged_output(args.out, managed=OUTPUT_FILES) as stage:  # all files or none
            write_text(os.path.join(stage, "residues.csv"), residue_csv(res.residues))
            write_json(os.path.join(stage, "validation.json"), out)
            try:
                plot_residue_fit(res.residues, os.path.join(stage, "rscc.png"), res.register_shifts)
            except Exception as exc:  # matplotlib missing: the tables are still written
                print(f"no plot: {exc}")
    if args.json:
        print(json.dumps(out))
        return 0
    s = res.summary
    print(f"maps phased by the model: R-work {s['r_work']:.4f}  R-free {s['r_free']:.4f}  d_min {s['d_min']:.2f} Å")
    for k, v in s.items():
        if k.startswith("mean_rscc_"):
            print(f"mean RSCC {k[10:]:8s} {v:.3f}")
    print("worst residues (RSCC):")
    for r in res.worst:
        print(f"  {r['chain']}/{r['seq']}{r['icode']} {r['name']:4s} {r['rscc']:.3f}  (Z {r['rscc_z']})")
    if res.register_shifts:
        print("possible register shifts:")
        for f in res.register_shifts:
            print(f"  chain {f['chain']} {f['start']}-{f['end']}: shift {f['shift']:+d}  ΔCC {f['score']:.3f} "
                  f"({f['cc_model']:.3f} -> {f['cc_shift']:.3f})")
    elif s["register_windows_scanned"] == 0:
        print(f"no register scan: no protein chain segment of {s['register_window']} or more residues")
    else:
        print(f"no register shift found ({s['register_windows_scanned']} windows scanned)")
    if args.out:
        print(f"wrote {args.out}/residues.csv, validation.json, rscc.png")
    return 0
