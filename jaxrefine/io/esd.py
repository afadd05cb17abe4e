"""mmCIF with standard uncertainties: ``_atom_site.Cartn_x_esd/_y_esd/_z_esd`` and ``B_iso_or_equiv_esd``.

gemmi's Structure holds no esds, so the document is made with ``st.make_mmcif_document()`` and the
columns are added to its ``_atom_site`` loop, whose rows follow the model's atom order.
"""
from __future__ import annotations

import gemmi
import numpy as np

from ..errors import InputError
from .writers import atomic_write, updated_structure

ESD_TAGS = ("Cartn_x_esd", "Cartn_y_esd", "Cartn_z_esd", "B_iso_or_equiv_esd")


def _fmt(v, digits: int) -> str:
    return "?" if not np.isfinite(v) else f"{v:.{digits}f}"


def write_model_with_esds(model, path, xyz_esd, b_esd, keep=None, **updates) -> None:
    """Write ``model`` (with :func:`jaxrefine.io.writers.updated_structure` updates) to mmCIF with esd columns.

    Args:
        xyz_esd: (n, 3) σ of x, y, z (Å); b_esd: (n,) σ of B (Å²), in model order ("?" where not finite).
        keep: (n,) bool atoms to write (removed waters left out); the updates are for the kept atoms.
    """
    xyz_esd, b_esd = np.asarray(xyz_esd, float), np.asarray(b_esd, float)
    if keep is not None and not np.all(keep):
        model = model.subset(np.asarray(keep, bool))
        xyz_esd, b_esd = xyz_esd[keep], b_esd[keep]
    st = updated_structure(model, **updates)
    st.setup_entities()
    doc = st.make_mmcif_document()
    block = doc.sole_block()
    cat = block.get_mmcif_category("_atom_site.", raw=True)
    n_rows = len(cat.get("id", []))
    if n_rows != len(b_esd):
        raise InputError(f"{path}: the mmCIF has {n_rows} atoms but {len(b_esd)} esds were given")
    names = [n.strip('"') for n in cat["auth_atom_id"]] if "auth_atom_id" in cat else None
    if names is not None and names != [str(a) for a in model.atom_name]:
        raise InputError(f"{path}: the _atom_site rows are not in the model's atom order")
    out = {}
    for tag, vals in cat.items():
        out[tag] = vals
        if tag == "Cartn_z":
            for k, t in enumerate(ESD_TAGS[:3]):
                out[t] = [_fmt(v, 3) for v in xyz_esd[:, k]]
        if tag == "B_iso_or_equiv":
            out[ESD_TAGS[3]] = [_fmt(v, 2) for v in b_esd]
    block.set_mmcif_category("_atom_site.", out, raw=True)
    with atomic_write(path, suffix=".cif") as tmp:
        doc.write_file(tmp)


def with_file_hydrogens(full, model, xyz_esd, b_esd, xyz_cart, b_iso, occ):
    """The esds and refined arrays of ``model`` spread over ``full``: the same file read with its hydrogens.

    ``model`` is ``full`` without hydrogens, in the same order (as :func:`jaxrefine.io.model.read_model`
    reads it with ``hydrogens=False``).  Hydrogen rows keep the file's coordinates, B and occupancy, and get
    no esds (NaN, written "?"): the uncertainties are those of the atoms that were refined.

    Returns:
        (xyz_esd (n, 3), b_esd (n,), xyz_cart (n, 3), b_iso (n,), occ (n,)) over ``full``'s atoms.
    """
    heavy = ~np.asarray(full.is_hydrogen, bool)
    same = int(heavy.sum()) == model.n_atoms and all(
        np.array_equal(getattr(full, k)[heavy], getattr(model, k)) for k in ("atom_name", "res_seq", "chain_id", "altloc"))
    if not same:
        raise InputError(f"{full.source}: its atoms without the hydrogens are not the atoms the esds belong to")
    out = [np.full((full.n_atoms, 3), np.nan), np.full(full.n_atoms, np.nan), np.array(full.xyz_cart, float),
           np.array(full.b_iso, float), np.array(full.occ, float)]
    for arr, vals in zip(out, (xyz_esd, b_esd, xyz_cart, b_iso, occ)):
        arr[heavy] = np.asarray(vals, float)
    return tuple(out)


def read_esds(path):
    """(xyz_esd (n, 3), b_esd (n,)) from an mmCIF's ``_atom_site`` loop (NaN for "?")."""
    block = gemmi.cif.read(str(path)).sole_block()
    cols = [list(block.find_values(f"_atom_site.{t}")) for t in ESD_TAGS]
    if any(len(c) == 0 for c in cols):
        raise InputError(f"{path}: no _atom_site esd columns ({', '.join(ESD_TAGS)})")
    vals = np.array([[gemmi.cif.as_number(v) for v in c] for c in cols], float).T
    return vals[:, :3], vals[:, 3]
