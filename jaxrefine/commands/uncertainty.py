"""``jaxrefine uncertainty MODEL DATA [--out DIR] [--config FILE] [--set key=value ...]``."""
from __future__ import annotations

HELP = ("Per-atom coordinate and B uncertainties of a model as given (refined by jaxrefine or another program), "
        "from the curvature of the −log posterior (ML X-ray term + restraints); --out writes uncertainty.cif "
        "(_atom_site.Cartn_x_esd ... B_iso_or_equiv_esd), uncertainty.json and uncertainty.png.")


def add_arguments(p):
    p.add_argument("model", help="model file (PDB or mmCIF)")
    p.add_argument("data", help="reflections (MTZ or structure-factor mmCIF)")
    p.add_argument("--out", "-o", default="uncertainty", help="output folder (default ./uncertainty)")
    p.add_argument("--config", "-c", help="YAML config (see configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--monlib", help="CCP4 monomer library folder (else $CLIBD_MON, else the built-in protein set)")
    p.add_argument("--labin", help="data columns, e.g. FP,SIGFP,FREE")
    p.add_argument("--block-only", action="store_true", help="block-diagonal estimate only (fast; a lower bound)")
    p.add_argument("--cutoff", type=float, default=6.0, help="colouring distance in Å (default 6)")
    p.add_argument("--curvature", choices=["gauss-newton", "exact"], default="gauss-newton",
                   help="the Gauss–Newton matrix (default; positive semi-definite at any model) or the exact Hessian "
                        "(only at a minimum of the −log posterior)")
    p.add_argument("--weights", choices=["posterior", "refinement"], default="posterior",
                   help="restraints as −log prior (default) or with the refinement's w_A")


def run(args) -> int:
    from ..config import load_config

    sets = list(args.set) + ["output.plots=true"]
    if args.monlib:
        sets.append(f"model.monlib={args.monlib}")
    if args.labin:
        sets.append(f"data.labin={args.labin}")
    cfg = load_config(args.config, sets)
    from ..validate.uncertainty import model_uncertainty

    s = model_uncertainty(args.model, args.data, args.out, cfg, coupled=not args.block_only, cutoff=args.cutoff,
                          weights=args.weights, curvature=args.curvature)
    d = s["dpi"]
    sb = "n/a" if s["sigma_b_median"] is None else f"{s['sigma_b_median']:.2f} Å²"
    print(f"RMS σ_r {s['sigma_r_rms']:.3f} Å (block-diagonal {s['sigma_r_block_rms']:.3f} Å), median σ_B {sb}; "
          f"Cruickshank DPI (R-free) {d['dpi_free']:.3f} Å")
    print(f"wrote {args.out}/uncertainty.cif, uncertainty.json, uncertainty.png")
    return 0
