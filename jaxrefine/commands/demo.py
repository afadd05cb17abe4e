"""``jaxrefine demo --out DIR``: the embedded SYNTHETIC demonstration."""
from __future__ import annotations

from . import count

HELP = (
    "Build a small SYNTHETIC crystal (an ideal helix-loop-helix peptide in P 21 21 21), simulate its data "
    "with bulk solvent and noise, perturb the model and refine it. No files or internet needed."
)


def add_arguments(p):
    p.add_argument("--out", "-o", default="jaxrefine-demo", help="output folder (default: jaxrefine-demo)")
    p.add_argument("--cycles", type=count, default=6, help="macrocycles (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="do not write the PNG plot")


def run(args) -> int:
    from ..demo import run_demo

    plots = not args.no_plots
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib not installed: skipping the plot (pip install 'jaxrefine[plots]')")
            plots = False
    m = run_demo(args.out, n_cycles=args.cycles, plots=plots, seed=args.seed, cycle_progress=None)
    print(f"SYNTHETIC demo done: R-work {m['r_work']:.4f}  R-free {m['r_free']:.4f}  rms bond {m['rms_bond']:.4f} Å  "
          f"({m['wall_s']:.0f} s); results in {args.out}/refined/" + (" (r_vs_cycle.png)" if plots else ""))
    return 0
