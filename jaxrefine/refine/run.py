"""One refinement run from files to an output folder, with a log file beside the results."""
from __future__ import annotations

import logging
import os

from ..config import Config
from ..io.writers import protect
from .cache import enable_compilation_cache
from ..problem.setup import build_setup
from .engine import HEADER, format_cycle, refine
from .outputs import write_outputs

log = logging.getLogger("jaxrefine")


def run_refinement(model_path, data_path, out_dir, cfg: Config | None = None, progress=None, plot_title: str | None = None,
                   after_minimise=(), between_cycles=()) -> dict:
    """Read, refine, write.  Returns the metrics dict (as in metrics.json).

    Args:
        progress: callable taking one line of text per macrocycle (e.g. ``print`` in a notebook; the
            CLI leaves it None because its logging already shows the lines).
        plot_title: title of the R-vs-cycle plot (``output.plots``).
        after_minimise, between_cycles: actions run in each macrocycle (see
            :func:`jaxrefine.refine.engine.refine`); the CLI passes the water actions of
            :func:`jaxrefine.validate.waters.water_hooks`.  None by default.
    """
    cfg = cfg or Config()
    protect(model_path, data_path)
    os.makedirs(out_dir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(out_dir, "refine.log"), mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    root = logging.getLogger("jaxrefine")
    root.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    try:
        cache = enable_compilation_cache(cfg.runtime.compilation_cache)
        log.info("compilation cache: %s", cache or "off")
        setup = build_setup(model_path, data_path, cfg)
        log.info("%s: %d atoms; %s: %d reflections (%d free), %.2f-%.2f Å; monomer library: %s",
                 model_path, setup.model.n_atoms, data_path, setup.refl.n, setup.refl.n_free,
                 setup.refl.d_max, setup.refl.d_min, setup.monlib or "built-in")

        def cb(st):
            if progress is not None:
                if st.cycle == 0:
                    progress(HEADER)
                progress(format_cycle(st))

        result = refine(setup, callback=cb, after_minimise=after_minimise, between_cycles=between_cycles)
        for w in result.warnings:
            if progress is not None:
                progress("warning: " + w)
        metrics = write_outputs(result, setup, out_dir)
        if cfg.output.plots:
            from ..io.figures import plot_r_vs_cycle

            kw = {"title": plot_title} if plot_title else {}
            plot_r_vs_cycle(metrics["cycles"], os.path.join(out_dir, "r_vs_cycle.png"), **kw)
        return metrics
    finally:
        root.removeHandler(handler)
        handler.close()
