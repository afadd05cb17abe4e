"""Restraint topology through gemmi: monomer library -> padded numpy restraint arrays.

The CCP4 monomer library (Vagin et al. 2004, Acta Cryst. D60, 2184) is read with
``gemmi.read_monomer_lib`` and applied with ``gemmi.prepare_topology`` (links between residues,
modifications and alternative conformations resolved by gemmi as in servalcat).  The result is
converted once into static index arrays (:class:`jaxrefine.restraints.Restraints`).  Without a
library the built-in protein dictionary (:mod:`jaxrefine.io.builtin`) is used.
The arrays are the plain containers of :mod:`jaxrefine.core.restraint_terms`; the non-bonded
neighbour list is built from them in :mod:`jaxrefine.problem.neighbours`.
"""
from __future__ import annotations

import logging
import math
import os

import gemmi
import numpy as np

from ..errors import InputError, RestraintError
from .model import _kind_of
from ..core.restraint_terms import (
    AdpTerm,
    AngleTerm,
    BondTerm,
    ChiralTerm,
    PlaneTerm,
    Restraints,
    TorsionTerm,
    pad_rows,
    padded_length,
)

log = logging.getLogger(__name__)

CHIRAL_SIGMA = 0.2  # Å³; REFMAC5/servalcat default esd of chiral volumes (Murshudov et al. 2011)
ADP_SIGMA_12 = 1.5  # Å²; B difference allowed between bonded atoms (REFMAC5 BFAC defaults)
ADP_SIGMA_13 = 2.0  # Å²; ... between 1-3 (angle) neighbours
# Bondi (1964) J. Phys. Chem. 68, 441 van der Waals radii (Å), fallback when ener_lib lacks a type
BONDI_RADIUS = {"H": 1.20, "C": 1.70, "N": 1.55, "O": 1.52, "F": 1.47, "P": 1.80, "S": 1.80, "CL": 1.75, "SE": 1.90}
HB_CODE = {"D": 1, "A": 2, "B": 3}

# gemmi links consecutive amino acids only when C(i)–N(i+1) < 1.5 × 1.341 Å (its are_connected); its looser
# test for a continuous chain is Cα–Cα < 5 Å (are_connected2, used to find where polymers end)
PEPTIDE_C_N = 1.341  # Å, ideal peptide C–N (gemmi's reference length)
PEPTIDE_LINK_TOL = 1.5  # gemmi's factor on it
CHAIN_CA_CA = 5.0  # Å

HELP_FIX = "supply its dictionary with --ligand FILE.cif (e.g. from acedrg or grade), or point --monlib DIR / $CLIBD_MON at a full CCP4 monomer library"


def find_monlib(monlib=None) -> str | None:
    """The monomer library directory: the argument, else ``$CLIBD_MON``, else None (built-in set).

    Raises:
        InputError: the directory given (or in ``$CLIBD_MON``) does not exist.
    """
    for source, path in (("--monlib", monlib), ("$CLIBD_MON", os.environ.get("CLIBD_MON"))):
        if path:
            path = os.fspath(path)
            if not os.path.isdir(path):
                raise InputError(f"{path}: monomer library directory ({source}) not found; pass --monlib DIR")
            return path
    return None


# MonLibs read in this process, by what they were read from (see _monlib_key); a run reads the same one for the
# restraints, the riding hydrogens' placement and every refresh of their frames (5e5z warm: 5 reads, 0.28 s)
_MONLIBS: dict = {}
_MONLIBS_KEPT = 8
_MONOMER_PATHS = gemmi.MonLib()  # an empty library: its path(code) is gemmi's file name of a monomer (c/CON_CON.cif)


def _mtime(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _monlib_key(monlib_dir, resnames, ligands) -> tuple:
    """What a MonLib is read from: the folder, the residues, the files (with their modification times, so that a
    dictionary edited between two runs in one session is read again)."""
    files = list(ligands)
    if monlib_dir is not None:
        files += [os.path.join(monlib_dir, "list", "mon_lib_list.cif"), os.path.join(monlib_dir, "ener_lib.cif")]
        files += [os.path.join(monlib_dir, _MONOMER_PATHS.path(r)) for r in sorted(resnames)]
    return monlib_dir, frozenset(resnames), tuple(ligands), tuple(_mtime(f) for f in files)


def _load_monlib(monlib_dir, resnames, ligands) -> gemmi.MonLib:
    from .builtin import builtin_monlib_cif

    if monlib_dir is not None:
        lib = gemmi.read_monomer_lib(monlib_dir, list(resnames), libin=ligands[0] if ligands else "", ignore_missing=True)
        for p in ligands[1:]:
            lib.read_monomer_cif(p)
    else:
        lib = gemmi.MonLib()
        lib.read_monomer_doc(gemmi.cif.read_string(builtin_monlib_cif()))
        for p in ligands:
            lib.read_monomer_cif(p)
    return lib


def _read_monlib(monlib_dir, resnames, ligands, source) -> gemmi.MonLib:
    """gemmi MonLib with the residues of the model; the built-in set when ``monlib_dir`` is None.  Read once per
    process for the same files; each caller gets its own copy (``MonLib.clone``, ~4 ms against ~55 ms a read)."""
    from .builtin import BUILTIN_RESIDUES

    ligands = [os.fspath(p) for p in ligands]
    for p in ligands:
        if not os.path.exists(p):
            raise InputError(f"{p}: ligand dictionary not found (--ligand)")
    key = _monlib_key(monlib_dir, resnames, ligands)
    lib = _MONLIBS.get(key)
    if lib is None:
        lib = _load_monlib(monlib_dir, resnames, ligands)
        while len(_MONLIBS) >= _MONLIBS_KEPT:
            _MONLIBS.pop(next(iter(_MONLIBS)))
        _MONLIBS[key] = lib
    missing = sorted(r for r in set(resnames) if r not in lib.monomers)
    if missing:
        where = f"monomer library {monlib_dir}" if monlib_dir else (
            f"built-in dictionary (only {len(BUILTIN_RESIDUES)} standard residues; no --monlib or $CLIBD_MON given)"
        )
        raise RestraintError(f"{source}: no restraint dictionary for residue(s) {', '.join(missing)} in the {where}; {HELP_FIX}")
    return lib.clone()


def _stretched_peptides(st: gemmi.Structure) -> list:
    """(previous residue, residue) pairs of one chain that form a continuous polypeptide (consecutive
    numbers, both amino acids, Cα–Cα < 5 Å) but whose C–N distance is beyond gemmi's link test.

    A model shaken by 0.5 Å RMS, or a poor molecular-replacement model, has such bonds (1va7 shaken: 18
    of ~250); gemmi would leave them unlinked: no bond, angle, ω or plane there, and a chain that
    refinement cannot close again.
    """
    out = []
    for ch in st[0]:
        for r1, r2 in zip(ch, list(ch)[1:]):
            if r2.seqid.num - r1.seqid.num not in (0, 1):
                continue
            if not all(_polymer_amino_acid(r) for r in (r1, r2)):
                continue
            c, n, ca1, ca2 = (r.find_atom(name, "*") for r, name in ((r1, "C"), (r2, "N"), (r1, "CA"), (r2, "CA")))
            if None in (c, n, ca1, ca2):
                continue
            if c.pos.dist(n.pos) >= PEPTIDE_C_N * PEPTIDE_LINK_TOL and ca1.pos.dist(ca2.pos) < CHAIN_CA_CA:
                out.append((r1, r2))
    return out


def _polymer_amino_acid(res) -> bool:
    """A protein residue (the model's own classification) of a polymer: not a ligand, not a free amino acid."""
    return _kind_of(res) == "protein" and res.entity_type == gemmi.EntityType.Polymer


def _close_stretched_peptides(st: gemmi.Structure, source: str, quiet: bool = False) -> dict:
    """Move N of each stretched peptide (in ``st``, a copy used for the topology only) along the C→N line
    to the ideal distance, so that gemmi links the residues.  The ω dihedral (hence cis/trans) is
    unchanged by a move along that axis.

    Returns:
        {atom index: (3,) shift (Å) applied to that N}, the index read from the atom's ``fraction`` field minus 1
        (:func:`jaxrefine.io.hydrogens.riding_sites` numbers the atoms there to move them back; the restraints
        need no return value).  ``quiet``: no warning (a second topology of a model already reported).
    """
    pairs = _stretched_peptides(st)
    moved = {}
    for r1, r2 in pairs:
        cs = {a.altloc: a for a in r1 if a.name == "C"}
        for n in (a for a in r2 if a.name == "N"):
            c = cs.get(n.altloc) or next(iter(cs.values()))
            d = n.pos - c.pos
            new = c.pos + d * (PEPTIDE_C_N / d.length())
            moved[int(round(n.fraction)) - 1] = np.array((new - n.pos).tolist())
            n.pos = new
    if pairs and not quiet:
        shown = ", ".join(f"{r1.name} {r1.seqid.num}-{r2.seqid.num}" for r1, r2 in pairs[:5])
        log.warning("%s: %d peptide bonds longer than %.2f Å (Cα–Cα < %.0f Å: one chain) kept as links with their "
                    "restraints: %s%s", source, len(pairs), PEPTIDE_C_N * PEPTIDE_LINK_TOL, CHAIN_CA_CA, shown,
                    " ..." if len(pairs) > 5 else "")
    return moved


def _topology(st: gemmi.Structure, lib: gemmi.MonLib, source: str) -> gemmi.Topo:
    _close_stretched_peptides(st, source)
    warnings = []

    class _Log:
        def write(self, text):  # gemmi writes warnings to this object
            warnings.append(text.strip())

        def flush(self):
            pass

    try:
        topo = gemmi.prepare_topology(st, lib, h_change=gemmi.HydrogenChange.NoChange, warnings=_Log())
    except (RuntimeError, ValueError) as exc:
        raise RestraintError(f"{source}: gemmi.prepare_topology failed ({exc}); {HELP_FIX}") from exc
    for w in filter(None, warnings):
        log.warning("%s: topology: %s", source, w)
    return topo


def _energy_types(st, lib):
    """(n_atoms,) vdW radius (Å) and hb type code from ener_lib via each atom's chem_type."""
    from .builtin import BUILTIN_VDW

    ener = lib.ener_lib.atoms
    radii, hb = [], []
    for ch in st[0]:
        for res in ch:
            cc = lib.monomers[res.name] if res.name in lib.monomers else None
            types = {a.id: a.chem_type for a in cc.atoms} if cc is not None else {}
            for a in res:
                ctype = types.get(a.name, "")
                t = ener.get(ctype)
                el = a.element.name.upper()
                if t is not None and t.vdw_radius > 0:
                    # vdwh (radius of the atom with its hydrogens) where defined, as servalcat does
                    r = t.vdwh_radius if t.vdwh_radius > 0 else t.vdw_radius
                    code = HB_CODE.get(t.hb_type, 0)
                elif ctype in BUILTIN_VDW:  # built-in dictionary (no ener_lib)
                    r, code = BUILTIN_VDW[ctype][0], HB_CODE.get(BUILTIN_VDW[ctype][1], 0)
                else:
                    r = BONDI_RADIUS.get(el, 1.8)
                    code = 0
                radii.append(r)
                hb.append(code)
    return np.array(radii, float), np.array(hb, np.int32)


def _torsion_used(label: str, in_peptide: bool) -> bool:
    """servalcat's default torsion rules (as REFMAC5): χ of peptide residues, ω of links and
    every sp2–sp2 torsion; other dictionary torsions (ligand sp3 rotors, ψ/φ) are not restrained."""
    return (label.startswith("chi") and in_peptide) or label == "omega" or label.startswith("sp2_sp2")


def _idx(atoms):
    return [a.serial - 1 for a in atoms]


def _restraint_rows(topo, lib, model, is_h, hydrogens: bool):
    """(bonds, angles, torsions, chirals, planes) of a gemmi topology as lists of rows, in the
    atom order of ``model``; restraints touching a hydrogen are dropped unless ``hydrogens``."""

    def keep(ix):
        return hydrogens or not is_h[ix].any()

    bonds = []
    for b in topo.bonds:
        ix = np.array(_idx(b.atoms))
        if keep(ix):
            bonds.append({"idx": ix, "ideal": b.restr.value, "sigma": b.restr.esd})
    angles = []
    for a in topo.angles:
        ix = np.array(_idx(a.atoms))
        if keep(ix):
            angles.append({"idx": ix, "ideal": math.radians(a.restr.value), "sigma": math.radians(a.restr.esd)})
    tors = []
    peptide = {gemmi.ChemComp.Group.Peptide}  # servalcat matches group "peptide" only (not P-peptide)
    res_group = {name: lib.monomers[name].group for name in set(model.res_name.tolist()) if name in lib.monomers}
    for t in topo.torsions:
        ix = np.array(_idx(t.atoms))
        if keep(ix) and t.restr.esd > 0 and _torsion_used(t.restr.label, res_group.get(model.res_name[ix[1]]) in peptide):
            tors.append({"idx": ix, "ideal": math.radians(t.restr.value), "sigma": math.radians(t.restr.esd), "period": max(int(t.restr.period), 1)})
    chirs = []
    sign_code = {gemmi.ChiralityType.Positive: 1, gemmi.ChiralityType.Negative: -1, gemmi.ChiralityType.Both: 0}
    for c in topo.chirs:
        ix = np.array(_idx(c.atoms))
        if keep(ix):
            chirs.append({"idx": ix, "ideal": topo.ideal_chiral_abs_volume(c), "sigma": CHIRAL_SIGMA, "sign": sign_code[c.restr.sign]})
    planes = []
    for p in topo.planes:
        ix = [i for i in _idx(p.atoms) if hydrogens or not is_h[i]]
        if len(ix) >= 4:
            planes.append((ix, p.restr.esd))
    return bonds, angles, tors, chirs, planes


def _plane_term(planes, q) -> PlaneTerm:
    """Padded planes: (idx, esd) rows -> (m, max atoms per plane) index and atom-mask arrays."""
    max_pl = max([len(ix) for ix, _ in planes], default=4)
    m = padded_length(len(planes), **q)
    pl_idx = np.zeros((m, max_pl), np.int32)
    pl_am = np.zeros((m, max_pl))
    pl_sig = np.ones(m)
    for k, (ix, esd) in enumerate(planes):
        pl_idx[k, : len(ix)] = ix
        pl_am[k, : len(ix)] = 1.0
        pl_sig[k] = esd
    return PlaneTerm(idx=pl_idx, atom_mask=pl_am, sigma=pl_sig, mask=pad_rows(np.ones(len(planes)), m, 0.0))


def _adp_term(bonds, angles, q) -> AdpTerm:
    """B-similarity pairs: bonded atoms (σ ADP_SIGMA_12) and the ends of each angle (ADP_SIGMA_13)."""
    adp_pairs = {}
    for r in bonds:
        adp_pairs.setdefault(tuple(sorted(r["idx"].tolist())), ADP_SIGMA_12)
    for r in angles:
        adp_pairs.setdefault(tuple(sorted((int(r["idx"][0]), int(r["idx"][2])))), ADP_SIGMA_13)
    adp_rows = [{"idx": np.array(k), "sigma": s} for k, s in sorted(adp_pairs.items())]
    m = padded_length(len(adp_rows), **q)
    return AdpTerm(
        idx=pad_rows(np.array([r["idx"] for r in adp_rows], np.int32).reshape(-1, 2), m, 0),
        sigma=pad_rows(np.array([r["sigma"] for r in adp_rows], float), m, 1.0),
        mask=pad_rows(np.ones(len(adp_rows)), m, 0.0),
    )


def build_restraints(model, monlib=None, ligands=(), hydrogens=False, pad_quantum: int | None = None) -> Restraints:
    """Restraint arrays for a model, from the monomer library (or the built-in protein set).

    Args:
        model: :class:`jaxrefine.io.model.Model` (its gemmi structure is used, not modified).
        monlib: monomer library directory; None: ``$CLIBD_MON``, else the built-in dictionary.
        ligands: extra dictionary files (mmCIF) for ligands absent from the library.
        hydrogens: keep restraints involving hydrogens (when the model has them).  With False the
            model should already be read without hydrogens (``read_model(..., hydrogens=False)``);
            restraints to any hydrogen left are dropped.
        pad_quantum: pad every list to a multiple of this (default ``terms.PAD_QUANTUM``).

    Returns:
        :class:`Restraints`, atom indices in the order of ``model`` arrays.

    Raises:
        RestraintError: a residue has no dictionary (named, with how to supply one).
    """
    if model.structure is None:
        raise InputError(f"{model.source}: model has no gemmi structure; read it with read_model()")
    source = model.source or "model"
    st = model.structure.clone()
    n = 0
    for res in st[0].all():
        res.atom.serial = n + 1
        n += 1
    if n != model.n_atoms:
        raise InputError(f"{source}: structure has {n} atoms but the model arrays {model.n_atoms}")
    lib = _read_monlib(find_monlib(monlib), st[0].get_all_residue_names(), ligands, source)
    topo = _topology(st, lib, source)
    is_h = np.asarray(model.is_hydrogen, bool)
    if is_h.any() and not hydrogens:
        log.warning("%s: %d hydrogens in the model get no restraints (hydrogens=False); read the model with "
                    "read_model(..., hydrogens=False) to drop them", source, int(is_h.sum()))

    q = {} if pad_quantum is None else {"quantum": pad_quantum}
    bonds, angles, tors, chirs, planes = _restraint_rows(topo, lib, model, is_h, hydrogens)
    _warn_unbonded(model, bonds, is_h, source)
    bt = _padded(bonds, 2, q)
    at = _padded(angles, 3, q)
    tt = _padded(tors, 4, q, extra={"period": (1, np.int32)})
    ct = _padded(chirs, 4, q, extra={"sign": (0, np.int32)})
    plane = _plane_term(planes, q)
    adp = _adp_term(bonds, angles, q)
    radii, hb = _energy_types(st, lib)
    dinc14 = np.array([DINC_14.get(e.upper(), DINC_14_OTHER) for e in model.element])
    altloc = np.array([ord(a) if a else 0 for a in model.altloc], np.int32)
    return Restraints(
        bond=BondTerm(**bt),
        angle=AngleTerm(**at),
        torsion=TorsionTerm(**tt),
        plane=plane,
        chiral=ChiralTerm(**ct),
        adp=adp,
        vdw_radius=radii,
        hb_type=hb,
        altloc=altloc,
        dinc14=dinc14,
    )


def _warn_unbonded(model, bonds, is_h, source, show: int = 5) -> None:
    """Log the non-hydrogen atoms of polymer/ligand residues that no bond restraint reaches: an atom
    whose name the dictionary does not know (renamed, misspelt) is otherwise held only by the data."""
    bonded = np.zeros(model.n_atoms, bool)
    for r in bonds:
        bonded[list(r["idx"])] = True
    residue_size = np.bincount(model.res_index, weights=~is_h, minlength=int(model.res_index.max()) + 1)
    lone = ~bonded & ~is_h & (model.kind != "water") & (residue_size[model.res_index] > 1)
    if lone.any():
        idx = np.nonzero(lone)[0]
        labels = ", ".join(f"{model.chain_id[i]}/{model.res_name[i]} {model.res_seq[i]}/{model.atom_name[i]}" for i in idx[:show])
        more = f" and {len(idx) - show} more" if len(idx) > show else ""
        log.warning("%s: %d atoms have no bond restraints (names not in the dictionary?): %s%s", source, len(idx), labels, more)


def _padded(rows, width, q, extra=None):
    """Columns idx/ideal/sigma(/extra) of restraint rows padded to a multiple of the quantum."""
    m = padded_length(len(rows), **q)
    out = {
        "idx": pad_rows(np.array([r["idx"] for r in rows], np.int32).reshape(-1, width), m, 0),
        "ideal": pad_rows(np.array([r["ideal"] for r in rows], float), m, 0.0),
        "sigma": pad_rows(np.array([r["sigma"] for r in rows], float), m, 1.0),
        "mask": pad_rows(np.ones(len(rows)), m, 0.0),
    }
    for k, (fill, dtype) in (extra or {}).items():
        out[k] = pad_rows(np.array([r[k] for r in rows], dtype), m, fill)
    return out


# d_min increments (Å) of REFMAC5 (VDWR INCR keywords) as used by servalcat: each atom of a 1-4
# pair adds its element's value (Murshudov et al. 2011); see problem/neighbours.py for the list.
DINC_14 = {"O": -0.1, "N": -0.1, "C": -0.15}
DINC_14_OTHER = -0.15
