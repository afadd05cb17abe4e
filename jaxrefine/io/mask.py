"""Bulk-solvent mask of the unit cell, built with gemmi's ``SolventMasker``.

The mask is the flat bulk-solvent model of Jiang & Brünger (1994), J. Mol. Biol. 243, 100:
grid points farther than r_vdW + r_probe from every atom (all symmetry copies, periodic cell)
are solvent; the protein region is then shrunk back by r_shrink (Phenix/REFMAC convention).
gemmi objects stay in this module; callers get a numpy grid (1 = solvent, 0 = macromolecule).
"""
from __future__ import annotations

import gemmi
import numpy as np

from .crystal_io import gemmi_cell, gemmi_space_group

RADII_SETS = {"refmac": gemmi.AtomicRadiiSet.Refmac, "vdw": gemmi.AtomicRadiiSet.VanDerWaals, "cctbx": gemmi.AtomicRadiiSet.Cctbx}


def mask_grid_shape(crystal, d_min: float, spacing: float = 0.6) -> tuple:
    """FFT-friendly grid (nu, nv, nw) for a cell, compatible with the space-group symmetry.

    The spacing is ``min(spacing, d_min / 2)`` Å (Nyquist for data to d_min) rounded up to
    sizes with small prime factors that the symmetry operators map onto the grid.
    """
    spacing = min(spacing, d_min / 2.0 - 1e-6)
    key = (tuple(float(v) for v in crystal.cell), crystal.space_group, spacing)
    if key not in _GRID_SHAPES:  # gemmi's size search took 13-27 ms, and the mask is rebuilt every macrocycle
        grid = gemmi.FloatGrid()
        grid.unit_cell = gemmi_cell(crystal)
        grid.spacegroup = gemmi_space_group(crystal)
        grid.set_size_from_spacing(spacing, gemmi.GridSizeRounding.Up)
        _GRID_SHAPES[key] = (grid.nu, grid.nv, grid.nw)
    return _GRID_SHAPES[key]


_GRID_SHAPES: dict = {}  # (cell, space group, spacing) -> grid shape, once per process


def _gemmi_model(model, xyz_cart=None, occ=None) -> gemmi.Model:
    """gemmi.Model of ``model`` with optionally replaced coordinates / occupancies (model order)."""
    if model.structure is None:
        raise ValueError(f"{model.source}: model has no gemmi structure")
    gm = model.structure[0].clone()
    xyz = model.xyz_cart if xyz_cart is None else np.asarray(xyz_cart, float)
    q = model.occ if occ is None else np.asarray(occ, float)
    i = 0
    for ch in gm:
        for res in ch:
            for a in res:
                a.pos = gemmi.Position(*xyz[i])
                a.occ = float(q[i])
                i += 1
    return gm


def _gemmi_model_from_arrays(xyz_cart, elements, occ) -> gemmi.Model:
    gm = gemmi.Model("1")
    ch = gemmi.Chain("A")
    for i, (p, el, q) in enumerate(zip(np.asarray(xyz_cart, float), elements, np.asarray(occ, float))):
        res = gemmi.Residue()
        res.name = "UNK"
        res.seqid = gemmi.SeqId(i + 1, " ")
        a = gemmi.Atom()
        a.name = str(el).upper()
        a.element = gemmi.Element(str(el))
        a.pos = gemmi.Position(*p)
        a.occ = float(q)
        res.add_atom(a)
        ch.add_residue(res)
    gm.add_chain(ch)
    return gm


def solvent_mask(
    model,
    crystal,
    grid_shape,
    r_probe: float = 1.0,
    r_shrink: float = 0.8,
    xyz_cart=None,
    radii: str = "refmac",
    island_min_volume: float = 50.0,
) -> np.ndarray:
    """Binary bulk-solvent mask of the whole unit cell.

    Args:
        model: :class:`jaxrefine.io.model.Model`, or a tuple ``(xyz_cart (n, 3) Å, elements (n,), occ (n,))``.
        crystal: cell and space group (symmetry copies and cell edges are handled by gemmi).
        grid_shape: (nu, nv, nw) grid points along a, b, c (see :func:`mask_grid_shape`).
        r_probe: solvent probe radius added to the atomic radii (Å).
        r_shrink: shrink-back radius (Å).
        xyz_cart: (n, 3) Å coordinates replacing the model's (the mask is rebuilt when atoms move).
        radii: atomic radii set, "refmac" (REFMAC/servalcat), "vdw" or "cctbx".
        island_min_volume: remove solvent islands smaller than this (Å³; gemmi's REFMAC
            preset uses 50); 0 keeps all.

    Returns:
        (nu, nv, nw) uint8 array, 1 = bulk solvent, 0 = macromolecule; index [i, j, k] is the fractional point
        (i/nu, j/nv, k/nw).  A quarter of float32's bytes: 5kzb's 5.5-million-point grid is rebuilt every
        macrocycle, and its float32 copies (host and device, 22 MB each) raised the peak resident memory.
    """
    if isinstance(model, tuple):
        gm = _gemmi_model_from_arrays(*model)
    else:
        gm = _gemmi_model(model, xyz_cart)
    # gemmi's 8-bit grid: the same mask as its float grid (every shared dataset, bit for bit) in 25-35 % less time
    # (5kzb's 5.5 million points 192 -> 127 ms, 4iid 274 -> 213 ms: a quarter of the memory to fill and symmetrise)
    grid = gemmi.Int8Grid(*[int(n) for n in grid_shape])
    grid.set_unit_cell(gemmi_cell(crystal))
    grid.spacegroup = gemmi_space_group(crystal)
    masker = gemmi.SolventMasker(RADII_SETS[radii])
    masker.rprobe = float(r_probe)
    masker.rshrink = float(r_shrink)
    masker.island_min_volume = float(island_min_volume)
    masker.put_mask_on_int8_grid(grid, gm)
    return np.array(grid, copy=False).astype(np.uint8, order="C")
