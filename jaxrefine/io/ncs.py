"""Copies of the same chain (non-crystallographic symmetry) found by sequence alignment.

Polymer chains whose residue sequences align (gemmi's Needleman–Wunsch,
``gemmi.align_string_sequences``) with at least ``min_identity`` of the shorter chain identical
are copies.  Atoms are matched between two copies when their residues are aligned to each other
with the same residue name and the atoms have the same name; atoms with an alternate location
and hydrogens are left out (their counterparts are ambiguous).  The result is plain numpy index
arrays into the model's atom order, for :func:`jaxrefine.restraints.ncs.ncs_term`.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import gemmi
import numpy as np

MIN_IDENTITY = 0.9  # fraction of the shorter chain's residues identical in the alignment
MIN_RESIDUES = 10  # shorter chains (peptides) are not treated as NCS copies


class NcsCopies(NamedTuple):
    """One pair of copies: chain names and matched atoms (atoms1[k] ↔ atoms2[k])."""

    chain1: str
    chain2: str
    atoms1: np.ndarray
    atoms2: np.ndarray
    identity: float

    @property
    def name(self) -> str:
        return f"{self.chain1}-{self.chain2}"


def _polymer_residues(model):
    """{chain: [(res_index, res_name), ...]} of protein/nucleic residues, in file order."""
    out: dict = {}
    poly = np.isin(model.kind, ("protein", "nucleic"))
    seen = set()
    for i in np.flatnonzero(poly):
        r = int(model.res_index[i])
        if r in seen:
            continue
        seen.add(r)
        out.setdefault(str(model.chain_id[i]), []).append((r, str(model.res_name[i])))
    return out


def _aligned_residues(res1, res2):
    """Pairs (res_index1, res_index2) aligned with equal names, and the identity fraction."""
    names1 = [n for _, n in res1]
    names2 = [n for _, n in res2]
    aln = gemmi.align_string_sequences(names1, names2, [], gemmi.AlignmentScoring("p"))
    pairs = []
    i = j = 0
    for count, op in re.findall(r"(\d+)([MID])", aln.cigar_str()):
        for _ in range(int(count)):
            if op == "M":
                if names1[i] == names2[j]:
                    pairs.append((res1[i][0], res2[j][0]))
                i += 1
                j += 1
            elif op == "I":
                i += 1
            else:
                j += 1
    return pairs, len(pairs) / max(1, min(len(res1), len(res2)))


def _atoms_by_residue(model):
    """{res_index: {atom_name: atom}} of atoms without altloc, hydrogens excluded."""
    table: dict = {}
    ok = (model.altloc == "") & ~model.is_hydrogen
    for i in np.flatnonzero(ok):
        table.setdefault(int(model.res_index[i]), {})[str(model.atom_name[i])] = int(i)
    return table


def find_ncs_copies(model, min_identity=MIN_IDENTITY, min_residues=MIN_RESIDUES) -> list:
    """Every pair of chains that are copies of each other, with their matched atoms.

    Args:
        model: a :class:`jaxrefine.io.model.Model`.
        min_identity: fraction of the shorter chain's residues that must align identically.
        min_residues: chains with fewer polymer residues are skipped.

    Returns:
        list of :class:`NcsCopies` (chain order as in the file; empty when there are none).
    """
    chains = {c: r for c, r in _polymer_residues(model).items() if len(r) >= min_residues}
    atoms = _atoms_by_residue(model)
    names = list(chains)
    out = []
    for p, c1 in enumerate(names):
        for c2 in names[p + 1:]:
            pairs, identity = _aligned_residues(chains[c1], chains[c2])
            if identity < min_identity:
                continue
            a1, a2 = [], []
            for r1, r2 in pairs:
                t1, t2 = atoms.get(r1, {}), atoms.get(r2, {})
                for name in t1.keys() & t2.keys():
                    a1.append(t1[name])
                    a2.append(t2[name])
            order = np.argsort(a1, kind="stable")
            out.append(NcsCopies(c1, c2, np.asarray(a1, np.int64)[order], np.asarray(a2, np.int64)[order], identity))
    return out
