"""``jaxrefine refine MODEL DATA --out DIR [--config FILE] [--set key=value ...]``."""
from __future__ import annotations

from ..config import STRATEGY_SETTINGS, TARGETS
from . import positive_length

# option -> config key it sets (an error in its value names the option)
OPTION_KEYS = {"monlib": "model.monlib", "labin": "data.labin", "cycles": "refine.n_cycles", "strategy": "refine.strategy",
               "target": "refine.target", "weight": "weights.w_a", "d_min": "data.d_min"}

HELP = (
    "Refine a model against X-ray data (ML target, automatic w_A, bulk solvent) and write refined.cif/.pdb, "
    "maps.mtz, metrics.json, config.yaml and a log into --out."
)


def add_arguments(p):
    p.add_argument("model", help="model file (PDB or mmCIF)")
    p.add_argument("data", help="reflections (MTZ or structure-factor mmCIF)")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument("--config", "-c", help="YAML config (see configs/default.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set refine.n_cycles=3 --set weights.w_a=0.2")
    p.add_argument("--monlib", help="CCP4 monomer library folder (else $CLIBD_MON, else the built-in protein set)")
    p.add_argument("--ligand", action="append", default=[], help="extra restraint dictionary (CIF), repeatable")
    p.add_argument("--labin", help="data columns, e.g. FP,SIGFP,FREE")
    p.add_argument("--cycles", type=int, help="macrocycles (refine.n_cycles)")
    p.add_argument("--strategy", choices=STRATEGY_SETTINGS, help="refine.strategy")
    p.add_argument("--target", choices=TARGETS, help="refine.target")
    p.add_argument("--weight", help="w_A: a number or 'auto' (weights.w_a)")
    p.add_argument("--d-min", type=positive_length, help="high-resolution limit (Å)")
    p.add_argument("--plots", action="store_true", help="write PNG plots (needs matplotlib)")
    p.add_argument("--update-waters", action="store_true", help="pick new waters between macrocycles (waters.update_waters)")


def _overrides(args):
    sets = list(args.set)
    for attr, key in OPTION_KEYS.items():
        val = getattr(args, attr)
        if val is not None:
            sets.append(f"{key}={val}")
    if args.ligand:
        sets.append("model.ligands=[" + ",".join(f"'{x}'" for x in args.ligand) + "]")
    if args.plots:
        sets.append("output.plots=true")
    if args.update_waters:
        sets.append("waters.update_waters=true")
    return sets


def _check_options(args) -> None:
    """Validate each convenience option on its own, so that an error names the option (--weight)."""
    from ..config import load_config
    from ..errors import ConfigError

    for attr, key in OPTION_KEYS.items():
        val = getattr(args, attr)
        if val is not None:
            try:
                load_config(None, [f"{key}={val}"])
            except ConfigError as exc:
                option = "--" + attr.replace("_", "-")
                raise ConfigError(str(exc).replace(f"--set {key}", f"{option} ({key})", 1)) from None


def run(args) -> int:
    from ..config import load_config

    _check_options(args)  # options and config first: their errors come before JAX is imported
    cfg = load_config(args.config, _overrides(args))
    from ..refine.run import run_refinement
    from ..core.timing import process_age_s
    from ..validate.waters import water_hooks

    metrics = run_refinement(args.model, args.data, args.out, cfg, startup_s=process_age_s(), **water_hooks(cfg))
    if cfg.output.uncertainties:  # validate/ is above refine/: hooked here, after the outputs are written
        from ..validate.uncertainty import add_to_refinement

        add_to_refinement(args.out, args.data, cfg)
    print(f"final: R-work {metrics['r_work']:.4f}  R-free {metrics['r_free']:.4f}  "
          f"rms bond {metrics['rms_bond']:.4f} Å  rms angle {metrics['rms_angle']:.2f}°  ({metrics['wall_s']:.1f} s)")
    print(f"wrote {args.out}/refined.cif, refined.pdb, maps.mtz, metrics.json, config.yaml, refine.log")
    return 0
