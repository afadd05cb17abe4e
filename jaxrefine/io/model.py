"""Reading atomic models (PDB, mmCIF, gzipped too) through gemmi into numpy arrays.

The :class:`Model` keeps the gemmi structure it was read from (``structure``) so that writers
can preserve everything jaxrefine does not refine (headers, TER records, entity info).  Arrays
follow the order of ``structure[0]`` after optional hydrogen removal.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field, replace

import gemmi
import numpy as np

from ..core.crystal import Crystal
from ..errors import InputError, SelectionError
from .crystal_io import crystal_from_gemmi

log = logging.getLogger(__name__)

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


def metal_atoms(element) -> np.ndarray:
    """(n,) bool: atoms of a metal element (gemmi's periodic table), e.g. the Mg or Zn that waters and
    side chains coordinate at ~2.0-2.3 Å."""
    names = np.asarray(element).astype(str)
    metal = {e: gemmi.Element(e).is_metal for e in np.unique(names)}
    return np.array([metal[e] for e in names], bool)


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


SPECIAL_POSITION_DISTANCE = 0.5  # Å: an atom this close to one of its own symmetry images sits on a special position


def _open_text(path: str) -> list:
    import gzip

    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rt", errors="replace") as fh:
        return fh.read().splitlines(keepends=True)


def check_pdb_text(path: str) -> None:
    """Problems in a PDB file that gemmi reads without complaint.

    gemmi reads a coordinate it cannot parse (``abc``) as 0.0, and a file cut at a line end
    reads as a smaller model.  This scan refuses both: every ATOM/HETATM line must hold numbers
    in the coordinate, occupancy and B columns (PDB format v3.3, columns 31-66), and a file whose
    last record is an atom record, with no END, is taken as truncated.

    Raises:
        InputError: naming the file, the line and what to do.
    """
    lines = _open_text(path)
    last = ""
    has_end = False
    for no, line in enumerate(lines, 1):
        rec = line[:6].rstrip()
        if not rec:
            continue
        last = rec
        if rec in ("END", "ENDMDL"):
            has_end = True
        if rec not in ("ATOM", "HETATM"):
            continue
        for lo, hi, what, required in ((30, 38, "x", True), (38, 46, "y", True), (46, 54, "z", True),
                                       (54, 60, "occupancy", False), (60, 66, "B", False)):
            field_text = line[lo:hi].strip()
            if not field_text and not required:
                continue
            try:
                float(field_text)
            except ValueError:
                raise InputError(f"{path}: line {no}: {what} (columns {lo + 1}-{hi}) is {field_text!r}, not a number; "
                                 f"fix the atom record (PDB columns are fixed-width)") from None
    if last in ("ATOM", "HETATM", "ANISOU") and not has_end:
        raise InputError(f"{path}: the file ends inside the atom records without an END line (truncated?); "
                         f"check the file, or add END if it is complete")
    if lines and not lines[-1].endswith("\n") and lines[-1][:6].rstrip() in ("ATOM", "HETATM") and len(lines[-1].rstrip()) < 54:
        raise InputError(f"{path}: the last line is cut short (truncated file); copy the file again")


def read_structure(path: str | os.PathLike) -> gemmi.Structure:
    """gemmi.read_structure with a clear error for missing, unreadable or damaged files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: model file not found; check the path")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, not a model file; pass a PDB or mmCIF file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the model file ({exc.strerror})") from None
    if magic == b"\x1f\x8b" and not path.lower().endswith(".gz"):
        raise InputError(f"{path}: the file is gzip-compressed but not named .gz; rename it to {os.path.basename(path)}.gz")
    try:
        st = gemmi.read_structure(path)
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with its own text
        raise InputError(f"{path}: cannot read as PDB or mmCIF model ({' '.join(str(exc).split())})") from None
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise InputError(f"{path}: the model has no atoms; is this a model file (PDB or mmCIF)?")
    if st.input_format == gemmi.CoorFormat.Pdb:
        check_pdb_text(path)
    st.setup_entities()
    return st


def check_restraint_dictionary(path) -> None:
    """Refuse a --ligand file that is not a CIF restraint dictionary (e.g. a PDB model given by mistake).

    Raises:
        InputError: missing, unreadable, not CIF, or without a chem_comp block.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: ligand dictionary not found (--ligand); check the path")
    try:
        doc = gemmi.cif.read(path)
    except Exception as exc:  # gemmi's parse error
        raise InputError(f"{path}: not a CIF restraint dictionary ({' '.join(str(exc).split())[:120]}); "
                         f"--ligand takes a monomer-library CIF (e.g. from AceDRG or grade), not a model") from None
    if not any(b.find_mmcif_category("_chem_comp_atom.") or b.find_mmcif_category("_chem_comp.") for b in doc):
        raise InputError(f"{path}: no _chem_comp_atom loop, so not a restraint dictionary; --ligand takes a "
                         f"monomer-library CIF (e.g. from AceDRG or grade)")


def _atom_label(ch, res, a) -> str:
    alt = f".{a.altloc}" if a.altloc != "\0" else ""
    return f"{ch.name}/{res.name} {res.seqid.num}{res.seqid.icode.strip()}/{a.name}{alt}"


def fix_special_positions(st: gemmi.Structure, source: str = "") -> list:
    """Give atoms on special positions the occupancy their multiplicity requires (in place).

    An atom within SPECIAL_POSITION_DISTANCE of k of its own symmetry images occupies a site of
    multiplicity m = k + 1: the file convention is occupancy <= 1/m (a water on a 2-fold: 0.5).
    Occupancies above 1/m are divided by m.

    Returns:
        Labels of the atoms changed (each logged as a warning).
    """
    st.setup_cell_images()
    changed = []
    if not st.cell.images:
        return changed
    for ch in st[0]:
        for res in ch:
            for a in res:
                k = st.cell.is_special_position(a.pos, SPECIAL_POSITION_DISTANCE)
                if k and a.occ > 1.0 / (k + 1) + 1e-3:
                    new = a.occ / (k + 1)
                    log.warning("%s: %s is on a special position (multiplicity %d): occupancy %.2f -> %.2f",
                                source, _atom_label(ch, res, a), k + 1, a.occ, new)
                    a.occ = new
                    changed.append(_atom_label(ch, res, a))
    return changed


def check_model_values(st: gemmi.Structure, source: str = "") -> None:
    """Refuse atoms that cannot be refined: non-finite coordinates/B/occupancy, occupancy outside
    [0, 1] or all zero, negative B, the same atom twice (same chain, residue, name and altloc).

    Raises:
        InputError: naming the file, the first offending atom, how many there are and what to do.
    """
    bad = {}
    seen = {}
    any_occ = False
    for ch in st[0]:
        for res in ch:
            for a in res:
                label = _atom_label(ch, res, a)
                p = a.pos
                if not all(math.isfinite(v) for v in (p.x, p.y, p.z)):
                    bad.setdefault("non-finite coordinates", []).append(label)
                if not math.isfinite(a.b_iso) or not math.isfinite(a.occ):
                    bad.setdefault("non-finite B or occupancy", []).append(label)
                elif not 0.0 <= a.occ <= 1.0:
                    bad.setdefault("occupancy outside [0, 1]", []).append(f"{label} ({a.occ:g})")
                elif a.b_iso < 0:
                    bad.setdefault("negative B", []).append(f"{label} ({a.b_iso:g})")
                any_occ |= a.occ > 0
                key = (ch.name, res.seqid.num, res.seqid.icode, res.name, a.name, a.altloc)
                if key in seen:
                    bad.setdefault("duplicated atoms", []).append(label)
                seen[key] = True
    for what, atoms in bad.items():
        fix = {"duplicated atoms": "remove or rename the repeated atom lines"}.get(what, "fix these atoms in the model file")
        raise InputError(f"{source}: {len(atoms)} atom(s) with {what}, first {atoms[0]}; {fix}")
    if not any_occ:
        raise InputError(f"{source}: every atom has occupancy 0 (nothing scatters); set the occupancies (normally 1.0)")


def check_b_limits(model: "Model", b_max: float, b_min: float | None = None, option: str = "refine.b_max") -> None:
    """Refuse a model with B above ``b_max`` (Å²): such atoms scatter nothing and cannot recover.
    Atoms below ``b_min`` are only counted in the log (the B parametrisation raises them to it).

    Raises:
        InputError: naming the file, the count, the largest B and the option to change.
    """
    if b_min is not None and (model.b_iso < b_min).any():
        log.info("%s: %d atom(s) with B below refine.b_min = %g Å² start at %g Å²", model.source,
                 int((model.b_iso < b_min).sum()), b_min, b_min)
    over = model.b_iso > b_max
    if over.any():
        i = int(np.argmax(model.b_iso))
        raise InputError(
            f"{model.source}: {int(over.sum())} atom(s) with B above {option} = {b_max:g} Å² (largest {model.b_iso[i]:.4g} for "
            f"{model.chain_id[i]}/{model.res_name[i]} {model.res_seq[i]}/{model.atom_name[i]}); reset the B values "
            f"or raise {option}"
        )


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
    check_model_values(st, source)
    fix_special_positions(st, source)
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
            try:
                return np.isin(model.res_seq, [int(v) for v in val.split()])
            except ValueError:
                raise SelectionError(f"{model.source}: residue numbers expected in selection clause {t!r}, "
                                     f"e.g. 'resseq 10-20' or 'resseq 3 7 9'") from None
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
