"""jaxrefine: differentiable macromolecular X-ray refinement in JAX.

The public API is re-exported here; see README.md for a ten-line tour.
"""
__version__ = "0.1.0"

from .core.xla_options import apply_xla_defaults as _apply_xla_defaults

_apply_xla_defaults()  # before JAX starts its backend (XLA reads $XLA_FLAGS once)

from .errors import JaxrefineError, InputError, DataMismatchError, SelectionError, RestraintError, ConfigError  # noqa: F401
from .io.model import Model, read_model, select  # noqa: F401
from .io.reflections import Reflections, read_reflections, check_compatible  # noqa: F401
from .core.crystal import Crystal  # noqa: F401


def __getattr__(name):
    """Lazy access to the refinement API (importing jaxrefine does not import JAX)."""
    lazy = {
        "load_config": ("jaxrefine.config", "load_config"),
        "build_setup": ("jaxrefine.problem.setup", "build_setup"),
        "refine": ("jaxrefine.refine.engine", "refine"),
        "refined_model": ("jaxrefine.refine.engine", "refined_model"),
        "total_energy": ("jaxrefine.refine.energy", "total_energy"),
        "energy_terms": ("jaxrefine.refine.energy", "energy_terms"),
        "water_hooks": ("jaxrefine.validate.waters", "water_hooks"),
        "Params": ("jaxrefine.problem.params", "Params"),
        "Problem": ("jaxrefine.problem", "Problem"),
        "XrayState": ("jaxrefine.problem", "XrayState"),
        "run_refinement": ("jaxrefine.refine.run", "run_refinement"),
        "refine_many": ("jaxrefine.fleet", "refine_many"),
    }
    if name in lazy:
        import importlib

        mod, attr = lazy[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'jaxrefine' has no attribute {name!r}")
