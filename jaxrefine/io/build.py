"""Build a gemmi structure from arrays (for the synthetic demo crystal and for tests)."""
from __future__ import annotations

import gemmi
import numpy as np

from .model import Model, model_from_structure


def structure_from_atoms(atoms, cell, space_group: str, title: str = "jaxrefine synthetic") -> gemmi.Structure:
    """A one-model structure from a list of atom records.

    Args:
        atoms: iterable of dicts with keys chain, res_name, res_seq, atom_name, element, xyz (Å),
            b (Å²), occ; residues are formed from consecutive records with the same chain/res_seq.
        cell: (a, b, c, alpha, beta, gamma).
        space_group: Hermann–Mauguin symbol.
    """
    st = gemmi.Structure()
    st.name = title
    st.cell = gemmi.UnitCell(*[float(v) for v in cell])
    st.spacegroup_hm = gemmi.SpaceGroup(space_group).hm
    model = gemmi.Model("1")
    chains: dict[str, gemmi.Chain] = {}
    order = []
    current = {}
    for rec in atoms:
        ch = rec["chain"]
        if ch not in chains:
            chains[ch] = gemmi.Chain(ch)
            order.append(ch)
        key = (ch, rec["res_seq"])
        if current.get(ch) is None or current[ch].seqid.num != rec["res_seq"]:
            res = gemmi.Residue()
            res.name = rec["res_name"]
            res.seqid = gemmi.SeqId(int(rec["res_seq"]), " ")
            res.het_flag = "H" if rec["res_name"] == "HOH" else "A"
            chains[ch].add_residue(res)
            current[ch] = chains[ch][len(chains[ch]) - 1]
        a = gemmi.Atom()
        a.name = rec["atom_name"]
        a.element = gemmi.Element(rec["element"])
        a.pos = gemmi.Position(*[float(v) for v in rec["xyz"]])
        a.b_iso = float(rec.get("b", 20.0))
        a.occ = float(rec.get("occ", 1.0))
        current[ch].add_atom(a)
        del key
    for ch in order:
        model.add_chain(chains[ch])
    st.add_model(model)
    st.setup_entities()
    st.assign_serial_numbers()
    return st


def model_from_atoms(atoms, cell, space_group: str, source: str = "synthetic") -> Model:
    """:class:`Model` straight from atom records (see :func:`structure_from_atoms`)."""
    return model_from_structure(structure_from_atoms(atoms, cell, space_group), source=source)


def with_coordinates(model: Model, xyz_cart=None, b_iso=None, occ=None, u_aniso=None, tls=None) -> Model:
    """A copy of ``model`` whose arrays and gemmi structure carry new coordinates / B / occupancies
    (and ANISOU / TLS groups, as :func:`jaxrefine.io.writers.updated_structure` takes them)."""
    from .writers import updated_structure

    st = updated_structure(model, xyz_cart=xyz_cart, b_iso=b_iso, occ=occ, u_aniso=u_aniso, tls=tls)
    return model_from_structure(st, source=model.source, hydrogens=True)


def unique_hkl(crystal, d_min: float) -> np.ndarray:
    """All unique (ASU) reflections to ``d_min`` (Å), (n, 3) int, excluding 000 and absences."""
    from .crystal_io import gemmi_cell, gemmi_space_group

    hkl = np.array(gemmi.make_miller_array(gemmi_cell(crystal), gemmi_space_group(crystal), d_min), dtype=np.int32)
    ops = gemmi_space_group(crystal).operations()
    keep = np.array([not ops.is_systematically_absent(list(h)) for h in hkl], bool) if len(hkl) else np.zeros(0, bool)
    return hkl[keep & ~np.all(hkl == 0, axis=1)]
