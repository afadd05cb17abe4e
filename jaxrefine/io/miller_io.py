"""Miller-index enumeration through gemmi (the reciprocal asymmetric unit)."""
from __future__ import annotations

import numpy as np

import gemmi

from .crystal_io import gemmi_cell, gemmi_space_group


def unique_miller_indices(crystal, d_min: float, d_max: float = 0.0) -> np.ndarray:
    """(n, 3) int32 reflections of the reciprocal ASU with d_min <= d (<= d_max when > 0).

    Systematic absences are left out (gemmi's ``make_miller_array``, CCP4 ASU convention).

    Args:
        crystal: :class:`jaxrefine.core.crystal.Crystal`.
        d_min: high-resolution limit (Å).
        d_max: low-resolution limit (Å); 0 for none.
    """
    return np.asarray(
        gemmi.make_miller_array(gemmi_cell(crystal), gemmi_space_group(crystal), float(d_min), float(d_max)), np.int32
    )
