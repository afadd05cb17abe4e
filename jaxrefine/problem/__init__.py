"""Layer 3: the refinement problem.

``Params`` (what the optimiser moves, a pytree), ``AtomMaps`` and ``Problem`` (static arrays),
``Setup`` (a problem with its model, data and configuration) and :func:`build_setup`.
"""
from .params import AtomMaps, Params, atom_b, atom_occ, atom_xyz  # noqa: F401
from .problem import Problem, Setup, XrayData  # noqa: F401
from .setup import build_setup, current_model_arrays  # noqa: F401
