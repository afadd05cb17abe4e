"""Map output: the complete set of reflections to a resolution, and CCP4 maps from coefficients.

gemmi does the symmetry expansion and the FFT of the coefficients
(``Mtz.transform_f_phi_to_map``), and writes CCP4 map files (``Ccp4Map``).
"""
from __future__ import annotations

import gemmi
import numpy as np

from .crystal_io import gemmi_cell, gemmi_space_group
from .writers import atomic_write


def complete_hkl(crystal, d_min: float, d_max: float = 0.0) -> np.ndarray:
    """(n, 3) int: every unique reflection (CCP4 asymmetric unit, no systematic absences) in d_max..d_min Å."""
    return np.asarray(gemmi.make_miller_array(gemmi_cell(crystal), gemmi_space_group(crystal), d_min, d_max, True), np.int32)


def _mtz_with(crystal, hkl, coefficients) -> gemmi.Mtz:
    mtz = gemmi.Mtz(with_base=True)
    mtz.spacegroup = gemmi_space_group(crystal)
    mtz.set_cell_for_all(gemmi_cell(crystal))
    mtz.add_dataset("jaxrefine")
    mtz.add_column("F", "F")
    mtz.add_column("PHI", "P")
    c = np.asarray(coefficients)
    mtz.set_data(np.column_stack([np.asarray(hkl, float), np.abs(c), np.degrees(np.angle(c))]).astype(np.float32))
    return mtz


def map_from_coefficients(crystal, hkl, coefficients, grid_shape=None, sample_rate: float = 3.0) -> np.ndarray:
    """Real-space map of the unit cell from unique-reflection coefficients.

    ρ(x) = (1/V) Σ_h F(h) exp(−2πi h·x) over all symmetry and Friedel mates (gemmi).

    Args:
        crystal: cell and space group.
        hkl: (n, 3) int unique reflections; coefficients: (n,) complex.
        grid_shape: (nu, nv, nw); default from ``sample_rate`` (grid spacing d_min / sample_rate).

    Returns:
        (nu, nv, nw) float map; index [i, j, k] is the fractional point (i/nu, j/nv, k/nw).
    """
    mtz = _mtz_with(crystal, hkl, coefficients)
    if grid_shape is not None:
        grid = mtz.transform_f_phi_to_map("F", "PHI", exact_size=[int(n) for n in grid_shape])
    else:
        grid = mtz.transform_f_phi_to_map("F", "PHI", sample_rate=sample_rate)
    return np.array(grid, copy=True)


def write_ccp4_map(path, crystal, values) -> None:
    """Write a unit-cell map (nu, nv, nw) as a CCP4 map file, atomically."""
    grid = gemmi.FloatGrid(np.ascontiguousarray(values, dtype=np.float32))
    grid.set_unit_cell(gemmi_cell(crystal))
    grid.spacegroup = gemmi_space_group(crystal)
    ccp4 = gemmi.Ccp4Map()
    ccp4.grid = grid
    ccp4.update_ccp4_header()
    with atomic_write(path, suffix=".ccp4") as tmp:
        ccp4.write_ccp4_map(tmp)
