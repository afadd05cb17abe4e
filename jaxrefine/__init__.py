"""jaxrefine: differentiable macromolecular X-ray refinement in JAX.

The public API is re-exported here; see README.md for a ten-line tour.
"""
__version__ = "0.1.0"

from .errors import JaxrefineError, InputError, DataMismatchError, SelectionError, RestraintError, ConfigError  # noqa: F401
from .io.model import Model, read_model, select  # noqa: F401
from .io.reflections import Reflections, read_reflections, check_compatible  # noqa: F401
from .crystal import Crystal  # noqa: F401
