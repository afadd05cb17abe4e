"""``jaxrefine omit MODEL DATA --select "A/45-52" --out DIR``."""
from __future__ import annotations

import json

from . import count, number_at_least

HELP = ("Omit maps: remove a selection from the phasing model (optionally shake and/or briefly refine the rest), "
        "write the σA-weighted omit 2mFo−DFc / mFo−DFc (omit.mtz, CCP4 maps) and how the omitted atoms fit them; "
        "--composite N makes a composite omit map of the whole model in N pieces.")


OUTPUT_FILES = ("omit.mtz", "omit_2fofc.ccp4", "omit_fofc.ccp4", "model_omitted.pdb", "composite_omit_2fofc.ccp4", "omit.json")


def add_arguments(p):
    p.add_argument("model", help="model file (PDB or mmCIF)")
    p.add_argument("data", help="reflections (MTZ or structure-factor mmCIF)")
    p.add_argument("--select", "-s", help="atoms to omit, e.g. 'A/45-52' or 'resname ADP'")
    p.add_argument("--composite", type=number_at_least(2, integer=True), metavar="N", help="composite omit map in N pieces (instead of --select)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--labin", help="data columns, e.g. FP,SIGFP,FREE")
    p.add_argument("--shake", type=number_at_least(0.0, "Å"), default=0.0, metavar="RMS", help="shake the rest by RMS Å before the map")
    p.add_argument("--refine-cycles", type=count, default=0, help="refine the rest for this many macrocycles first")
    p.add_argument("--solvent-in-omit", action="store_true",
                   help="let bulk solvent fill the omitted volume (default: keep the full model's mask)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    import os

    from ..errors import InputError
    from ..io.maps_io import write_ccp4_map
    from ..io.model import read_model
    from ..io.reflections import check_compatible, read_reflections
    from ..io.writers import check_output_folder, protect, staged_output, write_json, write_model, write_mtz

    if not args.select and not args.composite:
        raise InputError(f"{args.model}: nothing to omit; pass --select 'A/45-52' or --composite N")
    protect(args.model, args.data)
    check_output_folder(args.out, OUTPUT_FILES, [args.model, args.data])
    model = read_model(args.model, hydrogens=False)
    refl = read_reflections(args.data, labin=args.labin)
    check_compatible(model.crystal, refl.crystal, args.model, args.data)
    kw = dict(shake_rms=args.shake, keep_solvent_mask=not args.solvent_in_omit)
    if args.refine_cycles > 0:  # the rest refined briefly before the map (with the default water actions)
        from functools import partial

        from ..config import Config
        from ..refine.engine import refine_briefly
        from ..validate.waters import water_hooks

        kw["refine_rest"] = partial(refine_briefly, n_cycles=args.refine_cycles, **water_hooks(Config()))
    with staged_output(args.out, managed=OUTPUT_FILES) as stage:  # all files or none
        out = {"model": str(args.model), "data": str(args.data)}
        if args.composite:
            from ..validate.omit import composite_omit_map

            comp, full = composite_omit_map(model, refl, n_pieces=args.composite, **kw)
            write_ccp4_map(os.path.join(stage, "composite_omit_2fofc.ccp4"), refl.crystal, comp)
            out.update(n_pieces=args.composite, d_min=full.d_min, files=["composite_omit_2fofc.ccp4"])
        else:
            from ..validate.omit import omit_map

            res = omit_map(model, refl, args.select, **kw)
            m = res.maps
            write_mtz(os.path.join(stage, "omit.mtz"), refl.crystal, m.hkl,
                      {"2FOFCWT/PH2FOFCWT": ("FP", m.two_coef), "FOFCWT/PHFOFCWT": ("FP", m.diff_coef)})
            write_ccp4_map(os.path.join(stage, "omit_2fofc.ccp4"), refl.crystal, m.two_fofc)
            write_ccp4_map(os.path.join(stage, "omit_fofc.ccp4"), refl.crystal, m.fofc)
            write_model(res.rest, os.path.join(stage, "model_omitted.pdb"))
            out.update(select=args.select, n_omitted=int(res.omitted.sum()), r_work=m.r_work, r_free=m.r_free,
                       d_min=m.d_min, cc_fofc=res.cc_fofc, cc_two_fofc=res.cc_two_fofc,
                       mean_fofc_sigma=res.mean_fofc_sigma, mean_two_fofc_sigma=res.mean_two_fofc_sigma,
                       files=["omit.mtz", "omit_2fofc.ccp4", "omit_fofc.ccp4", "model_omitted.pdb"])
        write_json(os.path.join(stage, "omit.json"), out)
    if args.json:
        print(json.dumps(out))
        return 0
    if args.composite:
        print(f"composite omit map in {args.composite} pieces written to {args.out}/composite_omit_2fofc.ccp4")
        return 0
    print(f"omitted {out['n_omitted']} atoms ({args.select}); maps phased by the rest: R-work {out['r_work']:.4f} "
          f"R-free {out['r_free']:.4f}")
    print(f"omit mFo-DFc at the omitted atoms: mean {out['mean_fofc_sigma']:.2f} σ, CC with their calculated density "
          f"{out['cc_fofc']:.3f} (2mFo-DFc: {out['mean_two_fofc_sigma']:.2f} σ, CC {out['cc_two_fofc']:.3f})")
    print(f"wrote {args.out}/" + ", ".join(out["files"]) + ", omit.json")
    return 0
