"""Layer 3: the refinement problem.

``Params`` (what the optimiser moves, a pytree), ``Problem`` (static arrays), ``XrayState`` (the
per-macrocycle mask, scales, σA, neighbours and w_A), ``Setup`` (all three with the model, data and
configuration they came from), :func:`build_setup`, and the X-ray state fit.  The problem's reflection arrays are
padded to a bucket size; :func:`observed` takes the data's part of a per-reflection array (e.g. for R-factors).
"""
from .params import AtomMaps, Params, atom_b, atom_occ, atom_xyz  # noqa: F401
from .problem import Problem, Setup, XrayData, XrayState, n_observed, observed  # noqa: F401
from .setup import build_setup  # noqa: F401
from .xray_state import current_model_arrays, f_model_of, model_of, update_xray_state  # noqa: F401
