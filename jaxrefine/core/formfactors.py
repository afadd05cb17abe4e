"""Container of Gaussian form-factor coefficients (filled by io/formfactor_io.py, evaluated by xray/formfactors.py)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class FormFactors(NamedTuple):
    """Gaussian coefficients per scattering type plus the atom -> type map.

    Attributes:
        a: (n_types, n_gauss) amplitudes (electrons).
        b: (n_types, n_gauss) widths (Å^2).
        c: (n_types,) constant term (electrons).
        type_index: (n_atoms,) int32 type of each atom.
    """

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    type_index: np.ndarray
