"""gemmi cell/space group -> :class:`jaxrefine.core.crystal.Crystal`."""
from __future__ import annotations

import gemmi
import numpy as np

from ..core.crystal import Crystal
from ..errors import InputError


def crystal_from_gemmi(cell: gemmi.UnitCell, sg: gemmi.SpaceGroup | None, source: str = "") -> Crystal:
    """Build a :class:`Crystal` from gemmi's cell and space group.

    Args:
        cell: gemmi unit cell.
        sg: gemmi space group; ``None`` raises (a model without CRYST1 cannot be refined).
        source: file name for the error message.
    """
    if sg is None:
        raise InputError(f"{source}: unknown or missing space group; add a CRYST1 record or _symmetry.space_group_name_H-M")
    if not cell.is_crystal() or cell.volume <= 1.0:
        raise InputError(f"{source}: no unit cell (found {cell.parameters}); add a CRYST1 record or _cell.length_a etc.")
    ops = sg.operations()
    den = float(gemmi.Op.DEN)
    rot, trans = [], []
    for cen in ops.cen_ops:
        for op in ops.sym_ops:
            rot.append(np.array(op.rot, dtype=float) / den)
            trans.append(((np.array(op.tran) + np.array(cen)) % gemmi.Op.DEN) / den)
    orth = np.array(cell.orth.mat.tolist(), dtype=float)
    frac = np.array(cell.frac.mat.tolist(), dtype=float)
    return Crystal(
        cell=np.array(cell.parameters, dtype=float),
        space_group=sg.hm,
        sg_number=int(sg.number),
        rot=np.array(rot),
        trans=np.array(trans),
        n_primitive_ops=len(ops.sym_ops),
        orth=orth,
        frac=frac,
    )


def gemmi_cell(crystal: Crystal) -> gemmi.UnitCell:
    """Inverse of :func:`crystal_from_gemmi` for the cell (used by writers and mask code in io/)."""
    return gemmi.UnitCell(*[float(v) for v in crystal.cell])


def gemmi_space_group(crystal: Crystal) -> gemmi.SpaceGroup:
    return gemmi.find_spacegroup_by_name(crystal.space_group)


def header_cell(data_path: str, model_path: str):
    """(space group name, (a, b, c, α, β, γ)) from an MTZ file's header (no data read), else from the model file;
    None when neither can be read (whoever reads the files in full reports why)."""
    try:
        if str(data_path).lower().endswith((".mtz", ".mtz.gz")):
            mtz = gemmi.read_mtz_file(str(data_path), with_data=False)
            return (mtz.spacegroup.hm if mtz.spacegroup else ""), tuple(mtz.cell.parameters)
        st = gemmi.read_structure(str(model_path))
        return st.spacegroup_hm, tuple(st.cell.parameters)
    except (RuntimeError, ValueError, OSError):
        return None
