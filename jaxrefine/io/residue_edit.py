"""Editing residues of a model's gemmi structure (renaming and replacing side chains).

Used by :func:`jaxrefine.validate.register.apply_register_shift`, which builds a deliberately
mis-registered model for tests and notebooks, and by water picking (adding HOH residues).
"""
from __future__ import annotations

import gemmi
import numpy as np

from ..errors import InputError
from .model import Model, model_from_structure


def _new_atom(name: str, element: str, xyz, b: float, occ: float) -> gemmi.Atom:
    atom = gemmi.Atom()
    atom.name, atom.element = name, gemmi.Element(element)
    atom.pos = gemmi.Position(*[float(v) for v in xyz])
    atom.b_iso, atom.occ = float(b), float(occ)
    return atom


def replace_residues(model: Model, replacements: dict, keep_atoms=("N", "CA", "C", "O", "OXT")) -> Model:
    """A model whose listed residues get a new name and new side-chain atoms.

    In each replaced residue the atoms named in ``keep_atoms`` of the first conformer stay (their
    altloc is cleared), every other atom is removed, and the new atoms are appended.

    Args:
        model: a model that was read from a file (it has a gemmi structure).
        replacements: res_index -> (new residue name, list of atom dicts with keys name,
            element, xyz (Å), b (Å²), occ).
        keep_atoms: atom names kept from the old residue.

    Returns:
        a new :class:`Model` (arrays re-read from the edited structure).
    """
    if model.structure is None:
        raise InputError(f"{model.source}: this model has no gemmi structure to edit")
    st = model.structure.clone()
    ri = -1
    for ch in st[0]:
        for res in ch:
            ri += 1
            if ri not in replacements:
                continue
            name, atoms = replacements[ri]
            first_alt = next((a.altloc for a in res if a.altloc != "\0"), "\0")
            for i in reversed(range(len(res))):
                a = res[i]
                if a.name not in keep_atoms or a.altloc not in ("\0", first_alt) or a.is_hydrogen():
                    del res[i]
                else:
                    a.altloc = "\0"
                    a.occ = 1.0
            res.name = name
            for rec in atoms:
                res.add_atom(_new_atom(rec["name"], rec["element"], rec["xyz"], rec.get("b", 20.0), rec.get("occ", 1.0)))
    st.setup_entities()
    return model_from_structure(st, source=model.source, hydrogens=True)


def add_waters(model: Model, xyz_cart, b_iso, chain: str = "W", occ: float = 1.0) -> Model:
    """A model with HOH residues appended (one O each) in a chain of their own.

    Args:
        model: a model with a gemmi structure.
        xyz_cart: (n, 3) Å; b_iso: (n,) Å².
        chain: chain name for the new waters (a new chain ``chain`` after the existing ones; its
            residue numbers continue after the largest water number of the model).
        occ: their occupancy (0: slots for water picking, :func:`jaxrefine.problem.setup.with_spare_waters`).
    """
    if model.structure is None:
        raise InputError(f"{model.source}: this model has no gemmi structure to edit")
    st = model.structure.clone()
    xyz_cart = np.asarray(xyz_cart, float).reshape(-1, 3)
    if len(xyz_cart) == 0:
        return model
    names = {c.name for c in st[0]}
    name = chain
    k = 0
    while name in names:
        k += 1
        name = f"{chain}{k}"
    start = int(model.res_seq.max()) + 1 if model.n_atoms else 1
    new = gemmi.Chain(name)
    for i, (x, b) in enumerate(zip(xyz_cart, np.asarray(b_iso, float).reshape(-1))):
        res = gemmi.Residue()
        res.name = "HOH"
        res.seqid = gemmi.SeqId(start + i, " ")
        res.het_flag = "H"
        res.entity_type = gemmi.EntityType.Water
        res.add_atom(_new_atom("O", "O", x, b, occ))
        new.add_residue(res)
    st[0].add_chain(new)
    st.setup_entities()
    st.assign_serial_numbers()
    return model_from_structure(st, source=model.source, hydrogens=True)
