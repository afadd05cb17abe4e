"""Register-shift detection: does the sequence, slid along the same backbone, fit the map better?

A one-residue register error (each residue of a segment carries the side chain of its neighbour)
is a classic model-building error that model-biased phases can hide (Kleywegt & Jones 1995,
Structure 3, 535; Read 1986, Acta Cryst. A42, 140).  For each chain segment we transplant the
side chain of residue i+s onto residue i's backbone by superposing the (N, CA, C) frames, for
s = −3..3, compute the calculated density of the shifted model (:func:`calc_density`) over the
grid points near any candidate side chain, and compare it with the 2mFo−DFc map by the real-space
correlation over sliding windows of ``window`` residues (Jones et al. 1991, Acta Cryst. A47, 110).
A window where some s ≠ 0 correlates better than s = 0 by more than ``threshold`` is flagged.

The map matters: a 2mFo−DFc map phased by the full model shows its own (wrong) side chains at
about half weight (model bias; Read 1986), and on 1l2h the shifted sequence then scores 0.10–0.12
*below* the wrong model.  :func:`register_maps` therefore phases the scan's map with the side
chains truncated to Cβ (an omit map of all side chains, no refinement), so that every candidate
sequence is judged by density that only the observed amplitudes put there.  Measured ΔCC (best
shift − model) on that map: deposited models of 4xof, 1l2h, 5orl, 4iid, 1va7 ≤ −0.05 and 5kzb
+0.05 (3.2 Å); deliberately shifted 10-residue segments +0.13 to +0.49 (see the issue-9 report).

Sign convention: ``shift = s`` means "residue i should carry the residue type now at i + s".
A model built with each residue given the type of its successor (:func:`apply_register_shift`
with shift +1) is therefore corrected by s = −1.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from .density import _corr_from_sums, calc_density_with_mates, fit_radius, grid_points_near, map_values_at

FRAME_ATOMS = ("N", "CA", "C")
MAIN_CHAIN = ("N", "CA", "C", "O", "OXT")
PEPTIDE_MAX = 2.0  # Å: C(i)–N(i+1) longer than this is a chain break
DEFAULT_SHIFTS = (-3, -2, -1, 1, 2, 3)
DEFAULT_WINDOW = 9
# ΔCC (shifted − model) over a window above which the window is flagged: between the largest ΔCC
# of a deposited model (5kzb, +0.05) and the smallest of a deliberately shifted segment (1l2h, +0.13)
DEFAULT_THRESHOLD = 0.08


class ResidueFrames(NamedTuple):
    """Protein residues with a complete (N, CA, C) frame, in chain segments without breaks.

    Attributes:
        segments: list of (chain, (L,) res_index array) in file order.
        origin: dict res_index -> (3,) CA (Å); axes: dict res_index -> (3, 3) orthonormal frame
            (columns x, y, z).
        side: dict res_index -> atom indices (into the model) of the side chain (first conformer,
            no hydrogens, CB included).
        name: dict res_index -> residue name.
        seq: dict res_index -> residue number.
    """

    segments: list
    origin: dict
    axes: dict
    side: dict
    name: dict
    seq: dict


def _frame(n, ca, c):
    """Orthonormal (3, 3) frame of a residue: x along CA→C, z normal to the N–CA–C plane."""
    x = c - ca
    x = x / np.linalg.norm(x)
    z = np.cross(x, n - ca)
    z = z / np.linalg.norm(z)
    return np.stack([x, np.cross(z, x), z], axis=1)


def residue_frames(model) -> ResidueFrames:
    """Frames and side-chain atoms of every protein residue of the model (see :class:`ResidueFrames`)."""
    ok = (model.kind == "protein") & ~model.is_hydrogen
    origin, axes, side, name, seq = {}, {}, {}, {}, {}
    chain_of = {}
    for ri in np.unique(model.res_index[ok]):
        at = np.nonzero((model.res_index == ri) & ok)[0]
        alts = [a for a in model.altloc[at] if a]
        first = alts[0] if alts else ""
        at = at[np.isin(model.altloc[at], ["", first])]
        names = model.atom_name[at]
        if not all(f in names for f in FRAME_ATOMS):
            continue
        pos = {nm: model.xyz_cart[i] for nm, i in zip(names, at)}
        origin[ri] = pos["CA"]
        axes[ri] = _frame(pos["N"], pos["CA"], pos["C"])
        side[ri] = at[~np.isin(names, MAIN_CHAIN)]
        name[ri] = str(model.res_name[at[0]])
        seq[ri] = int(model.res_seq[at[0]])
        chain_of[ri] = str(model.chain_id[at[0]])
        chain_of[(ri, "C")] = pos["C"]
        chain_of[(ri, "N")] = pos["N"]
    segments = []
    current = []
    prev = None
    for ri in sorted(origin):
        brk = prev is None or chain_of[ri] != chain_of[prev] or ri != prev + 1
        if not brk:
            brk = np.linalg.norm(chain_of[(prev, "C")] - chain_of[(ri, "N")]) > PEPTIDE_MAX
        if brk and current:
            segments.append((chain_of[current[0]], np.asarray(current)))
            current = []
        current.append(ri)
        prev = ri
    if current:
        segments.append((chain_of[current[0]], np.asarray(current)))
    return ResidueFrames(segments, origin, axes, side, name, seq)


def transplant(model, frames: ResidueFrames, donor: int, acceptor: int) -> np.ndarray:
    """(k, 3) side-chain coordinates of residue ``donor`` placed on the backbone of ``acceptor``.

    The rigid transform maps the donor's (N, CA, C) frame onto the acceptor's (a superposition of
    the two frames; with ideal backbones it is the least-squares fit of the three atoms).
    """
    local = (model.xyz_cart[frames.side[donor]] - frames.origin[donor]) @ frames.axes[donor]
    return local @ frames.axes[acceptor].T + frames.origin[acceptor]


def apply_register_shift(model, chain: str, start: int, end: int, shift: int = 1):
    """A model whose residues start..end of ``chain`` carry the name and side chain of residue i+shift.

    Each side chain is taken from the model's own residue i+shift and superposed on residue i's
    (N, CA, C) frame; main-chain atoms stay.  This is the deliberate register error of the tests.

    Args:
        model: :class:`jaxrefine.io.model.Model` read from a file.
        chain: chain id; start, end: residue numbers (inclusive).
        shift: signed residues (+1: each residue gets its successor's side chain).

    Returns:
        the shifted :class:`Model`.
    """
    from ..errors import SelectionError
    from ..io.residue_edit import replace_residues

    frames = residue_frames(model)
    by_seq = {(model.chain_id[np.argmax(model.res_index == ri)], frames.seq[ri]): ri for ri in frames.origin}
    repl = {}
    for num in range(start, end + 1):
        acc, don = by_seq.get((chain, num)), by_seq.get((chain, num + shift))
        if acc is None or don is None:
            raise SelectionError(f"{model.source}: residue {chain}/{num} or {chain}/{num + shift} is not a complete "
                                 "protein residue; choose a segment inside a chain")
        xyz = transplant(model, frames, don, acc)
        idx = frames.side[don]
        atoms = [{"name": str(model.atom_name[i]), "element": str(model.element[i]), "xyz": x,
                  "b": float(model.b_iso[i]), "occ": 1.0} for i, x in zip(idx, xyz)]
        repl[acc] = (frames.name[don], atoms)
    return replace_residues(model, repl)


class RegisterScan(NamedTuple):
    """Result of :func:`scan_register`.

    Attributes:
        flags: list of dicts (chain, start, end, shift, score, cc_model, cc_shift): flagged
            segments (residue numbers inclusive; score = ΔCC of the best window).
        windows: list of dicts (chain, start, end, cc: {shift: CC}) for every window scanned.
        threshold: ΔCC used.
    """

    flags: list
    windows: list
    threshold: float


class _Candidates(NamedTuple):
    """Side-chain atoms transplanted onto each position for each shift (concatenated over atoms)."""

    xyz: np.ndarray  # (m, 3) Å
    pos: np.ndarray  # (m,) position (residue of a scanned segment) they sit on
    shift: np.ndarray  # (m,) shift they come from
    weight: np.ndarray  # (m,) atomic number
    b: np.ndarray  # (m,) B (Å²)
    n_pos: int


def _candidate_side_chains(model, frames, seg_list, all_s):
    """For every position of every scanned segment and every shift s, the side chain of the residue
    s along the chain transplanted onto the position's backbone (None when there is none)."""
    cand_xyz, cand_pos, cand_s, cand_w, cand_b = [], [], [], [], []
    p = -1
    for _, seg in seg_list:
        for k, acc in enumerate(seg):
            p += 1
            for s in all_s:
                if not 0 <= k + s < len(seg):
                    continue
                don = seg[k + s]
                idx = frames.side[don]
                if len(idx) == 0:
                    continue
                cand_xyz.append(transplant(model, frames, don, acc))
                cand_pos.append(np.full(len(idx), p))
                cand_s.append(np.full(len(idx), s))
                cand_w.append(model.atomic_number[idx].astype(float))
                cand_b.append(model.b_iso[idx])
    if not cand_xyz:
        return None
    return _Candidates(np.concatenate(cand_xyz), np.concatenate(cand_pos), np.concatenate(cand_s),
                       np.concatenate(cand_w), np.concatenate(cand_b), p + 1)


def _position_sums(model, maps, frames, seg_list, all_s, cand: _Candidates, radius: float):
    """Per shift and position, the six sums of the correlation of observed and calculated density
    over the grid points near the position's candidate atoms; and (n_shifts, n_pos) bool: whether
    the position has a donor at that shift (a Gly donor adds no atoms)."""
    heavy = ~model.is_hydrogen
    side_all = np.concatenate([frames.side[ri] for _, seg in seg_list for ri in seg] or [np.zeros(0, np.int64)])
    fixed = heavy.copy()
    fixed[side_all] = False
    crystal = maps.crystal
    idx, pts = grid_points_near(cand.xyz, crystal, maps.two_fofc.shape, radius)
    owner = cand.pos[cKDTree(cand.xyz).query(pts)[1]]  # position of the nearest candidate atom
    rho_o = map_values_at(maps.two_fofc, idx)
    rho_fixed = calc_density_with_mates(pts, model.xyz_cart[fixed], model.atomic_number[fixed] * model.occ[fixed],
                                        model.b_iso[fixed], crystal, maps.d_min)
    valid = np.zeros((len(all_s), cand.n_pos), bool)
    offset = 0
    for _, seg in seg_list:
        k = np.arange(len(seg))
        for j, s in enumerate(all_s):
            valid[j, offset + k] = (k + s >= 0) & (k + s < len(seg))
        offset += len(seg)
    sums = np.zeros((len(all_s), 6, cand.n_pos))
    for j, s in enumerate(all_s):
        # positions without a donor at s keep their own side chain (their windows are not scored)
        use = (cand.shift == s) | ((cand.shift == 0) & ~valid[j, cand.pos])
        rho_c = rho_fixed + calc_density_with_mates(pts, cand.xyz[use], cand.weight[use], cand.b[use], crystal, maps.d_min)
        for q, w in enumerate((np.ones_like(rho_o), rho_o, rho_c, rho_o * rho_o, rho_c * rho_c, rho_o * rho_c)):
            sums[j, q] = np.bincount(owner, w, minlength=cand.n_pos)
    return sums, valid


def _score_windows(frames, seg_list, all_s, shifts, sums, valid, window: int, threshold: float):
    """(every window with its CC per shift, the windows where a shift beats the model by > threshold)."""
    windows, flags = [], []
    offset = 0
    for si, (chain, seg) in enumerate(seg_list):
        L = len(seg)
        cs = np.cumsum(np.concatenate([np.zeros((len(all_s), 6, 1)), sums[:, :, offset:offset + L]], axis=2), axis=2)
        wsum = cs[:, :, window:] - cs[:, :, :-window]  # (n_s, 6, L − window + 1)
        cc = _corr_from_sums(*[wsum[:, q] for q in range(6)])
        vcs = np.cumsum(np.concatenate([np.zeros((len(all_s), 1)), (~valid[:, offset:offset + L]).astype(int)], 1), 1)
        ok = (vcs[:, window:] - vcs[:, :-window]) == 0
        cc = np.where(ok, cc, np.nan)
        for w0 in range(L - window + 1):
            entry = {"chain": chain, "start": frames.seq[seg[w0]], "end": frames.seq[seg[w0 + window - 1]],
                     "cc": {int(s): (None if not np.isfinite(cc[j, w0]) else round(float(cc[j, w0]), 4))
                            for j, s in enumerate(all_s)}}
            windows.append(entry)
            c0 = cc[0, w0]
            if not np.isfinite(c0):
                continue
            alt = np.where(np.isfinite(cc[1:, w0]), cc[1:, w0], -np.inf)
            jb = int(np.argmax(alt))
            delta = alt[jb] - c0
            if delta > threshold:
                flags.append({"chain": chain, "start": entry["start"], "end": entry["end"], "shift": shifts[jb],
                              "score": round(float(delta), 4), "cc_model": round(float(c0), 4),
                              "cc_shift": round(float(alt[jb]), 4), "_w0": w0, "_seg": si})
        offset += L
    return windows, flags


def scan_register(model, maps, shifts=DEFAULT_SHIFTS, window: int = DEFAULT_WINDOW,
                  threshold: float = DEFAULT_THRESHOLD, radius: float | None = None) -> RegisterScan:
    """Score the sequence slid by each shift along every chain's backbone against the 2mFo−DFc map.

    Args:
        model: :class:`jaxrefine.io.model.Model` (hydrogens are ignored).
        maps: :class:`jaxrefine.validate.density.ModelMaps` (usually phased by this model).
        shifts: nonzero shifts to try (residues).
        window: residues per sliding window.
        threshold: ΔCC = CC(shift) − CC(model) above which a window is flagged.
        radius: Å around candidate side-chain atoms defining the scored grid points
            (default :func:`fit_radius`).

    Returns:
        :class:`RegisterScan`.
    """
    frames = residue_frames(model)
    radius = fit_radius(maps.d_min) if radius is None else float(radius)
    shifts = tuple(int(s) for s in shifts if s != 0)
    all_s = (0,) + shifts
    seg_list = [(ch, seg) for ch, seg in frames.segments if len(seg) >= window]
    cand = _candidate_side_chains(model, frames, seg_list, all_s)
    if cand is None:
        return RegisterScan([], [], threshold)
    sums, valid = _position_sums(model, maps, frames, seg_list, all_s, cand, radius)
    windows, flags = _score_windows(frames, seg_list, all_s, shifts, sums, valid, window, threshold)
    return RegisterScan(_merge_flags(flags), windows, threshold)


def _merge_flags(flags: list) -> list:
    """Merge overlapping flagged windows with the same shift into segments (best window's score)."""
    out = []
    for f in flags:
        last = out[-1] if out else None
        if last and last["_seg"] == f["_seg"] and last["shift"] == f["shift"] and f["_w0"] <= last["_w1"] + 1:
            last["end"] = f["end"]
            last["_w1"] = f["_w0"]
            if f["score"] > last["score"]:
                last.update(score=f["score"], cc_model=f["cc_model"], cc_shift=f["cc_shift"])
            continue
        g = dict(f)
        g["_w1"] = f["_w0"]
        out.append(g)
    return [{k: v for k, v in f.items() if not k.startswith("_")} for f in out]


def truncate_side_chains(model, keep=("N", "CA", "C", "O", "OXT", "CB")):
    """The model with every protein side chain cut back to Cβ (other residues untouched)."""
    drop = (model.kind == "protein") & ~np.isin(model.atom_name, keep)
    return model.subset(~drop)


def register_maps(model, refl, sample_rate: float = 3.0):
    """Maps for the register scan: phased by the model with its side chains truncated to Cβ.

    Phases of the full model put density where its own side chains are (model bias; Read 1986),
    which hides a register error; with the side chains omitted from the phasing model their
    density comes from the observed amplitudes alone, so that every shift is judged by the same map
    (the principle of omit maps, Bhat 1988, J. Appl. Cryst. 21, 279).
    """
    from .density import model_maps

    return model_maps(truncate_side_chains(model), refl, sample_rate=sample_rate)
