"""``jaxrefine geometry MODEL [--monlib DIR] [--ligand FILE.cif] [--json]``."""
from __future__ import annotations

import json

HELP = "Geometry report: RMS deviations and RMS Z per restraint type, worst outliers and clashes."


def add_arguments(p):
    p.add_argument("model", help="model file (PDB or mmCIF, .gz allowed)")
    p.add_argument("--monlib", help="CCP4 monomer library directory (default $CLIBD_MON, else the built-in protein set)")
    p.add_argument("--ligand", action="append", default=[], metavar="FILE.cif", help="extra restraint dictionary (repeatable)")
    p.add_argument("--hydrogens", action="store_true", help="keep hydrogens of the model (default: removed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from ..io.model import check_restraint_dictionary, read_model
    from ..io.topology import build_restraints, find_monlib
    from ..problem.adp_model import model_adp_ncs_statistics, statistics_lines
    from ..problem.neighbours import build_nonbonded
    from ..restraints import geometry_report

    for p in args.ligand:
        check_restraint_dictionary(p)
    find_monlib(args.monlib)
    model = read_model(args.model, hydrogens=args.hydrogens)
    restraints = build_restraints(model, monlib=args.monlib, ligands=args.ligand, hydrogens=args.hydrogens)
    rep = geometry_report(model.xyz_cart, restraints, build_nonbonded(model, restraints), model)
    extra = model_adp_ncs_statistics(model, restraints)  # NCS between copies; ADP restraints of ANISOU atoms
    if args.json:
        print(json.dumps({**rep.as_dict(), **extra}, indent=2))
        return 0
    print(f"model  {args.model}")
    print(f"{'type':10s} {'count':>7s} {'rmsd':>9s} {'rms Z':>7s}")
    for kind, unit in (("bond", "Å"), ("angle", "°"), ("torsion", "°"), ("plane", "Å"), ("chiral", "Å³")):
        n = getattr(rep, f"n_{kind}s")
        print(f"{kind:10s} {n:7d} {getattr(rep, f'rms_{kind}'):8.4f}{unit:1s} {getattr(rep, f'rms_z_{kind}'):7.3f}")
    print(f"non-bonded pairs {rep.n_nonbonded}, clashes (overlap ≥ 0.4 Å) {rep.n_clashes}, chiral centres of wrong hand {rep.n_chiral_wrong_sign}")
    for kind, rows in rep.outliers.items():
        for r in rows[:5]:
            print(f"  {kind:8s} z={r['z']:7.2f}  " + " - ".join(r["atoms"]))
    for c in rep.clashes[:10]:
        print(f"  clash    d={c['distance']:.2f} (min {c['d_min']:.2f}){' sym' if c['symmetry'] else ''}  " + " - ".join(c["atoms"]))
    for line in statistics_lines(extra):
        print(line)
    return 0
