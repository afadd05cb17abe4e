"""Reading CCP4 maps back into numpy (the counterpart of :func:`jaxrefine.io.maps_io.write_ccp4_map`)."""
from __future__ import annotations

import os

import gemmi
import numpy as np

from ..errors import InputError


def read_ccp4_map_values(path) -> np.ndarray:
    """(na, nb, nc) unit-cell values of a CCP4 map (expanded to the whole cell by gemmi's setup).

    Raises:
        InputError: missing or unreadable file.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: map file not found")
    try:
        ccp4 = gemmi.read_ccp4_map(path)
    except Exception as exc:  # gemmi raises RuntimeError with its own text
        raise InputError(f"{path}: cannot read as a CCP4 map ({exc})") from exc
    ccp4.setup(float("nan"))
    return np.array(ccp4.grid, copy=True)
