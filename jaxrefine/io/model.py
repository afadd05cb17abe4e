"""Reading atomic models (PDB, mmCIF, gzipped too) through gemmi into numpy arrays.

The :class:`Model` keeps the gemmi structure it was read from (``structure``) so that writers
can preserve everything jaxrefine does not refine (headers, TER records, entity info).  Arrays
follow the order of ``structure[0]`` after optional hydrogen removal.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

import gemmi
import numpy as np

from ..crystal import Crystal
from ..errors import InputError, SelectionError
from .crystal_io import crystal_from_gemmi

KINDS = ("protein", "nucleic", "water", "ligand")


@dataclass(frozen=True, eq=False)
class Model:
    """An atomic model as arrays (one atom per row) plus static labels.

    Attributes:
        xyz_cart: (n, 3) Cartesian coordinates (Å).
        b_iso: (n,) isotropic B (Å^2); for anisotropic atoms, B_eq.
        u_aniso: (n, 6) Cartesian U11 U22 U33 U12 U13 U23 (Å^2); zeros where isotropic.
        has_aniso: (n,) bool.
        occ: (n,) occupancy.
        element: (n,) element symbols (str, e.g. "C", "Fe").
        atomic_number: (n,) int.
        charge: (n,) int formal charge.
        altloc: (n,) str, "" when none.
        atom_name, res_name, chain_id, icode: (n,) str.
        res_seq: (n,) int residue number.
        res_index: (n,) int index of the residue (0..n_residues-1) in file order.
        kind: (n,) str, one of KINDS.
        is_hydrogen: (n,) bool.
        crystal: cell and symmetry.
        source: path read.
        structure: the gemmi.Structure (hydrogens removed if they were dropped); io/ only.
        meta: deposited R-work/R-free/resolution where the header has them.
    """

    xyz_cart: np.ndarray
    b_iso: np.ndarray
    u_aniso: np.ndarray
    has_aniso: np.ndarray
    occ: np.ndarray
    element: np.ndarray
    atomic_number: np.ndarray
    charge: np.ndarray
    altloc: np.ndarray
    atom_name: np.ndarray
    res_name: np.ndarray
    chain_id: np.ndarray
    res_seq: np.ndarray
    icode: np.ndarray
    res_index: np.ndarray
    kind: np.ndarray
    is_hydrogen: np.ndarray
    crystal: Crystal
    source: str = ""
    structure: gemmi.Structure | None = field(default=None, repr=False)
    meta: dict = field(default_factory=dict)

    @property
    def n_atoms(self) -> int:
        return int(self.xyz_cart.shape[0])

    @property
    def n_residues(self) -> int:
        return int(self.res_index.max()) + 1 if self.n_atoms else 0

    @property
    def n_chains(self) -> int:
        return len(set(self.chain_id.tolist()))

    @property
    def xyz_frac(self) -> np.ndarray:
        return self.crystal.to_frac(self.xyz_cart)

    def with_arrays(self, **arrays) -> "Model":
        """A copy with some arrays replaced (same atoms), e.g. ``xyz_cart=new``."""
        return replace(self, **arrays)

    def select(self, query: str) -> np.ndarray:
        """Boolean mask for a selection string; see :func:`select`."""
        return select(self, query)

    def subset(self, mask: np.ndarray) -> "Model":
        """A model with only the selected atoms (the gemmi structure is pruned to match)."""
        mask = np.asarray(mask, dtype=bool)
        arrays = {
            k: getattr(self, k)[mask]
            for k in self.__dataclass_fields__
            if isinstance(getattr(self, k), np.ndarray) and getattr(self, k).shape[:1] == (self.n_atoms,)
        }
        _, res_index = np.unique(arrays["res_index"], return_inverse=True)
        arrays["res_index"] = res_index.astype(np.int32)
        st = None
        if self.structure is not None:
            st = self.structure.clone()
            keep = iter(mask.tolist())
            flags = [[[next(keep) for _ in res] for res in ch] for ch in st[0]]
            for ch, ch_flags in zip(st[0], flags):
                for res, res_flags in zip(ch, ch_flags):
                    for ai in reversed(range(len(res))):
                        if not res_flags[ai]:
                            del res[ai]
            st.remove_empty_chains()
        return replace(self, structure=st, **arrays)


def _kind_of(res: gemmi.Residue) -> str:
    if res.is_water():
        return "water"
    info = gemmi.find_tabulated_residue(res.name)
    if info is not None:
        if info.is_amino_acid():
            return "protein"
        if info.is_nucleic_acid():
            return "nucleic"
    if res.entity_type == gemmi.EntityType.Polymer and res.het_flag != "H":
        return "protein"
    return "ligand"


def read_structure(path: str | os.PathLike) -> gemmi.Structure:
    """gemmi.read_structure with a clear error for missing or unreadable files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: model file not found")
    try:
        st = gemmi.read_structure(path)
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with its own text
        raise InputError(f"{path}: cannot read as PDB or mmCIF model ({exc})") from exc
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise InputError(f"{path}: the model has no atoms")
    st.setup_entities()
    return st


def model_from_structure(st: gemmi.Structure, source: str = "", hydrogens: bool = True) -> Model:
    """Arrays from a gemmi structure (first model only).

    Args:
        st: gemmi structure; not modified (a clone is kept).
        source: file name for messages.
        hydrogens: keep hydrogens (True) or drop them (False).
    """
    st = st.clone()
    if not hydrogens:
        st.remove_hydrogens()
    st.remove_empty_chains()
    if len(st) > 1:
        for i in reversed(range(1, len(st))):
            del st[i]
    crystal = crystal_from_gemmi(st.cell, st.find_spacegroup(), source)
    cols = {k: [] for k in ("xyz", "b", "u", "ha", "occ", "el", "z", "q", "alt", "an", "rn", "ch", "seq", "ic", "ri", "kind", "h")}
    ri = -1
    for ch in st[0]:
        for res in ch:
            ri += 1
            kind = _kind_of(res)
            for a in res:
                cols["xyz"].append(a.pos.tolist())
                cols["b"].append(a.b_iso)
                ani = a.aniso
                has = bool(ani.nonzero())
                cols["u"].append([ani.u11, ani.u22, ani.u33, ani.u12, ani.u13, ani.u23] if has else [0.0] * 6)
                cols["ha"].append(has)
                cols["occ"].append(a.occ)
                cols["el"].append(a.element.name)
                cols["z"].append(a.element.atomic_number)
                cols["q"].append(a.charge)
                cols["alt"].append(a.altloc if a.altloc != "\0" else "")
                cols["an"].append(a.name)
                cols["rn"].append(res.name)
                cols["ch"].append(ch.name)
                cols["seq"].append(res.seqid.num)
                cols["ic"].append(res.seqid.icode.strip())
                cols["ri"].append(ri)
                cols["kind"].append(kind)
                cols["h"].append(a.is_hydrogen())
    if not cols["xyz"]:
        raise InputError(f"{source}: no atoms left after reading (hydrogens={hydrogens})")
    meta = {"resolution": float(st.resolution) if st.resolution else None}
    if st.meta.refinement:
        ref = st.meta.refinement[0]
        meta["r_work"] = float(ref.r_work) if ref.r_work == ref.r_work else None
        meta["r_free"] = float(ref.r_free) if ref.r_free == ref.r_free else None
    return Model(
        xyz_cart=np.array(cols["xyz"], dtype=float),
        b_iso=np.array(cols["b"], dtype=float),
        u_aniso=np.array(cols["u"], dtype=float),
        has_aniso=np.array(cols["ha"], dtype=bool),
        occ=np.array(cols["occ"], dtype=float),
        element=np.array(cols["el"]),
        atomic_number=np.array(cols["z"], dtype=np.int32),
        charge=np.array(cols["q"], dtype=np.int32),
        altloc=np.array(cols["alt"]),
        atom_name=np.array(cols["an"]),
        res_name=np.array(cols["rn"]),
        chain_id=np.array(cols["ch"]),
        res_seq=np.array(cols["seq"], dtype=np.int32),
        icode=np.array(cols["ic"]),
        res_index=np.array(cols["ri"], dtype=np.int32),
        kind=np.array(cols["kind"]),
        is_hydrogen=np.array(cols["h"], dtype=bool),
        crystal=crystal,
        source=source,
        structure=st,
        meta=meta,
    )


def read_model(path: str | os.PathLike, hydrogens: bool = True) -> Model:
    """Read a PDB or mmCIF model (``.gz`` too).

    Args:
        path: model file.
        hydrogens: keep hydrogen atoms (default) or drop them.

    Raises:
        InputError: missing/unreadable file, no atoms, no cell or space group.
    """
    path = os.fspath(path)
    return model_from_structure(read_structure(path), source=path, hydrogens=hydrogens)


# ----------------------------------------------------------------------------- selections
_RANGE = re.compile(r"^(-?\d+)\s*[-:]\s*(-?\d+)$")
_SLASH = re.compile(r"^([A-Za-z0-9]+)?/(-?\d+)?(?:\s*-\s*(-?\d+))?(?:/([A-Za-z0-9']+))?$")


def _clause(model: Model, text: str) -> np.ndarray:
    t = text.strip()
    low = t.lower()
    if low.startswith("not "):
        return ~_clause(model, t[4:])
    if low in ("all", "*"):
        return np.ones(model.n_atoms, bool)
    if low in KINDS:
        return model.kind == low
    if low in ("hydrogen", "hydrogens"):
        return model.is_hydrogen
    if low in ("backbone", "mainchain"):
        return np.isin(model.atom_name, ["N", "CA", "C", "O"]) & (model.kind == "protein")
    parts = t.split(None, 1)
    if len(parts) == 2:
        key, val = parts[0].lower(), parts[1].strip()
        if key == "chain":
            return np.isin(model.chain_id, val.split())
        if key in ("resname", "resn"):
            return np.isin(model.res_name, val.upper().split())
        if key == "name":
            return np.isin(model.atom_name, val.split())
        if key == "element":
            return np.isin(np.char.upper(model.element.astype(str)), val.upper().split())
        if key in ("altloc", "altid"):
            return np.isin(model.altloc, val.split())
        if key in ("resseq", "resi", "resid"):
            m = _RANGE.match(val)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                return (model.res_seq >= lo) & (model.res_seq <= hi)
            return np.isin(model.res_seq, [int(v) for v in val.split()])
    m = _SLASH.match(t)
    if m:  # gemmi-like short form: A/45-52, A/45, /45-52, A/45/CA
        ch, lo, hi, name = m.groups()
        sel = np.ones(model.n_atoms, bool)
        if ch:
            sel &= model.chain_id == ch
        if lo is not None:
            lo = int(lo)
            hi = int(hi) if hi is not None else lo
            sel &= (model.res_seq >= lo) & (model.res_seq <= hi)
        if name:
            sel &= model.atom_name == name
        return sel
    raise SelectionError(
        f"{model.source}: cannot parse selection clause {t!r}; use e.g. 'A/45-52', 'chain A and resseq 10-20', "
        f"'protein', 'water', 'ligand', 'name CA', 'resname HOH', 'not hydrogen'"
    )


def select(model: Model, query: str) -> np.ndarray:
    """Boolean atom mask for a selection string.

    Grammar: clauses joined by ``or`` (lowest precedence) and ``and``; a clause is ``not X``,
    ``all``, ``protein``, ``nucleic``, ``water``, ``ligand``, ``hydrogen``, ``backbone``,
    ``chain A``, ``resseq 10-20``, ``resname HOH``, ``name CA``, ``element FE``, ``altloc A``,
    or the short form ``A/45-52`` (chain/residue range[/atom]).

    Raises:
        SelectionError: unparsable, or selecting no atoms.
    """
    mask = np.zeros(model.n_atoms, bool)
    for alt in re.split(r"\s+or\s+", query.strip(), flags=re.I):
        sub = np.ones(model.n_atoms, bool)
        for part in re.split(r"\s+and\s+", alt, flags=re.I):
            sub &= _clause(model, part)
        mask |= sub
    if not mask.any():
        raise SelectionError(f"{model.source}: selection {query!r} selects no atoms")
    return mask
