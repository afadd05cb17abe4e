"""``jaxrefine info MODEL [DATA] [--json]``."""
from __future__ import annotations

import json

from . import count, positive_length

HELP = "Summarise a model (atoms, residues, chains, cell, space group) and optionally its reflection data."


def add_arguments(p):
    p.add_argument("model", help="model file (PDB or mmCIF, .gz allowed)")
    p.add_argument("data", nargs="?", help="reflections (MTZ or structure-factor mmCIF)")
    p.add_argument("--labin", help="column labels, e.g. FP,SIGFP[,FREE] or IMEAN,SIGIMEAN")
    p.add_argument("--free-value", type=count, help="flag value of the free set (auto-detected otherwise)")
    p.add_argument("--d-min", type=positive_length, help="high-resolution limit (Å)")
    p.add_argument("--d-max", type=positive_length, help="low-resolution limit (Å)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args) -> int:
    from ..io.summary import summarise

    info = summarise(args.model, args.data, labin=args.labin, free_value=args.free_value, d_min=args.d_min, d_max=args.d_max)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model        {info['model']}")
    print(f"atoms        {info['n_atoms']}  ({info['n_hydrogens']} H)")
    print("  by element " + ", ".join(f"{k} {v}" for k, v in info["atoms_by_element"].items()))
    print("  by kind    " + ", ".join(f"{k} {v}" for k, v in info["atoms_by_kind"].items()))
    print(f"residues     {info['n_residues']}   chains {info['n_chains']} ({' '.join(info['chains'])})")
    print(f"space group  {info['space_group']} (No. {info['sg_number']})")
    print("cell         " + " ".join(f"{v:.3f}" for v in info["cell"]))
    if info.get("deposited"):
        print("deposited    " + ", ".join(f"{k} {v}" for k, v in info["deposited"].items() if v is not None))
    if args.data:
        print(f"data         {info['data']}")
        print(f"columns      {info['columns']}" + ("  (French–Wilson)" if info["from_intensities"] else ""))
        print(f"reflections  {info['n_reflections']} (work {info['n_work']}, free {info['n_free']}); free flags: {info['free_convention']}")
        print(f"resolution   {info['d_max']:.2f} – {info['d_min']:.2f} Å")
        if info["removed"]:
            print("removed      " + ", ".join(f"{k}: {v}" for k, v in info["removed"].items()))
    return 0
