"""TLS groups: read from a model's header (PDB REMARK 3 or mmCIF ``_pdbx_refine_tls*``), defined
from a selection spec, and put back into a gemmi structure for writing.

Files hold T in Å², L in deg² and S in Å·deg (PDB and mmCIF conventions, as gemmi reads them);
:class:`TlsGroups` holds radians (L in rad², S in Å·rad), the units of
:func:`jaxrefine.xray.adp.u_from_tls`.
"""
from __future__ import annotations

from typing import NamedTuple

import gemmi
import numpy as np

from ..errors import SelectionError

DEG = np.pi / 180.0


class TlsGroups(NamedTuple):
    """TLS groups as arrays.

    Attributes:
        group: (n_atoms,) int group of each atom, -1 for atoms in no group.
        origin: (g, 3) Å.
        t: (g, 6) Å² (U11 U22 U33 U12 U13 U23 order).
        l: (g, 6) rad².
        s: (g, 3, 3) Å·rad.
        ids: (g,) str group labels.
    """

    group: np.ndarray
    origin: np.ndarray
    t: np.ndarray
    l: np.ndarray  # noqa: E741 (the field's name)
    s: np.ndarray
    ids: tuple

    @property
    def n_groups(self) -> int:
        return int(self.origin.shape[0])


def _smat6(m) -> list:
    return [m.u11, m.u22, m.u33, m.u12, m.u13, m.u23]


def _range_mask(model, chain, begin, end):
    sel = model.chain_id == chain if chain else np.ones(model.n_atoms, bool)
    if begin.num is not None:  # gemmi gives None for an open end ("?")
        sel &= model.res_seq >= begin.num
    if end.num is not None:
        sel &= model.res_seq <= end.num
    return sel


def read_tls_groups(model) -> TlsGroups | None:
    """TLS groups of the model's header (the first refinement record that has any), or None.

    Atoms are assigned by each selection's chain and residue range; an atom in two groups
    belongs to the first.
    """
    st = model.structure
    if st is None:
        return None
    found = [r.tls_groups for r in st.meta.refinement if len(r.tls_groups)]
    if not found:
        return None
    groups = found[0]
    assign = np.full(model.n_atoms, -1, np.int32)
    for k, g in enumerate(groups):
        sel = np.zeros(model.n_atoms, bool)
        for s in g.selections:
            sel |= _range_mask(model, s.chain, s.res_begin, s.res_end)
        assign[sel & (assign < 0)] = k
    return TlsGroups(
        group=assign,
        origin=np.array([g.origin.tolist() for g in groups], float),
        t=np.array([_smat6(g.T) for g in groups], float),
        l=np.array([_smat6(g.L) for g in groups], float) * DEG**2,
        s=np.array([g.S.tolist() for g in groups], float) * DEG,
        ids=tuple(str(g.id) for g in groups),
    )


def tls_groups_from_spec(model, spec: str) -> TlsGroups:
    """Groups from ``"chain"`` (one per chain) or ``"A/1-120; A/121-250"`` (selections), with
    zero tensors and each origin at the centre of its atoms.  Waters are never in a group.

    Raises:
        SelectionError: a selection that selects no atoms (or only waters).
    """
    not_water = model.kind != "water"
    if spec.strip() == "chain":
        masks = [(model.chain_id == c) & not_water for c in dict.fromkeys(model.chain_id[not_water].tolist())]
    else:
        masks = []
        for part in (p.strip() for p in spec.split(";") if p.strip()):
            m = model.select(part) & not_water
            if not m.any():
                raise SelectionError(f"refine.tls_groups: selection {part!r} has no non-water atoms")
            masks.append(m)
    assign = np.full(model.n_atoms, -1, np.int32)
    for k, m in enumerate(masks):
        assign[m & (assign < 0)] = k
    g = len(masks)
    origin = np.array([model.xyz_cart[assign == k].mean(0) for k in range(g)]).reshape(g, 3)
    return TlsGroups(assign, origin, np.zeros((g, 6)), np.zeros((g, 6)), np.zeros((g, 3, 3)),
                     tuple(str(k + 1) for k in range(g)))


def _selections(model, atoms) -> list:
    """gemmi selections (chain, first and last residue number) covering the given atoms."""
    out = []
    for chain in dict.fromkeys(model.chain_id[atoms].tolist()):
        seq = model.res_seq[atoms][model.chain_id[atoms] == chain]
        s = gemmi.TlsGroup.Selection()
        s.chain = chain
        s.res_begin = gemmi.SeqId(int(seq.min()), " ")
        s.res_end = gemmi.SeqId(int(seq.max()), " ")
        s.details = f"{chain}/{int(seq.min())}-{int(seq.max())}"
        out.append(s)
    return out


def tls_to_gemmi(model, tls: TlsGroups) -> list:
    """gemmi.TlsGroup objects (file units: deg², Å·deg) for the groups."""
    out = []
    for k in range(tls.n_groups):
        g = gemmi.TlsGroup()
        g.id = tls.ids[k]
        g.selections = _selections(model, np.flatnonzero(tls.group == k))
        g.origin = gemmi.Position(*map(float, tls.origin[k]))
        g.T = gemmi.SMat33d(*map(float, tls.t[k]))
        g.L = gemmi.SMat33d(*map(float, tls.l[k] / DEG**2))
        g.S = gemmi.Mat33((tls.s[k] / DEG).tolist())
        out.append(g)
    return out


def set_tls_groups(structure: gemmi.Structure, model, tls: TlsGroups) -> None:
    """Store the groups in ``structure.meta`` (in place), where gemmi's mmCIF writer finds them."""
    if not len(structure.meta.refinement):
        structure.meta.refinement = [gemmi.RefinementInfo()]
    ref = structure.meta.refinement[0]
    ref.tls_groups = tls_to_gemmi(model, tls)
    if not ref.id:
        ref.id = "1"


def tls_pdb_remarks(model, tls: TlsGroups) -> list:
    """REMARK 3 TLS lines (the REFMAC layout gemmi and other readers parse), file units."""
    rem = "REMARK   3"
    lines = [f"{rem}  TLS DETAILS", f"{rem}   NUMBER OF TLS GROUPS  : {tls.n_groups:4d}"]
    for k, g in enumerate(tls_to_gemmi(model, tls)):
        t, l, s = tls.t[k], tls.l[k] / DEG**2, tls.s[k] / DEG
        lines += [rem, f"{rem}   TLS GROUP : {g.id:>5}", f"{rem}    NUMBER OF COMPONENTS GROUP : {len(g.selections):4d}",
                  f"{rem}    COMPONENTS        C SSSEQI   TO  C SSSEQI"]
        lines += [f"{rem}    RESIDUE RANGE :   {sel.chain:>1} {sel.res_begin.num:5d}        {sel.chain:>1} {sel.res_end.num:5d}"
                  for sel in g.selections]
        lines.append(f"{rem}    ORIGIN FOR THE GROUP (A): {tls.origin[k][0]:8.4f} {tls.origin[k][1]:8.4f} {tls.origin[k][2]:8.4f}")
        for name, v in (("T", t), ("L", l)):
            lines += [f"{rem}    {name} TENSOR",
                      f"{rem}      {name}11: {v[0]:8.4f} {name}22: {v[1]:8.4f}",
                      f"{rem}      {name}33: {v[2]:8.4f} {name}12: {v[3]:8.4f}",
                      f"{rem}      {name}13: {v[4]:8.4f} {name}23: {v[5]:8.4f}"]
        lines.append(f"{rem}    S TENSOR")
        lines += [f"{rem}      " + " ".join(f"S{i + 1}{j + 1}: {s[i, j]:8.4f}" for j in range(3)) for i in range(3)]
    return [ln.ljust(80) + "\n" for ln in lines]
