"""The ADP model of a refinement (``refine.adp``) and its local NCS restraints (``restraints.ncs``).

Three ways to describe atomic displacements, chosen per run:

- ``iso``: one B per atom (``Params.b_raw``); deposited ANISOU shapes stay fixed in F_calc.
- ``aniso``: six U_ij per atom for protein, nucleic and ligand atoms, through the Cholesky
  parametrisation of :func:`jaxrefine.xray.adp.u_from_cholesky` (``Params.u_raw``, positive
  definite by construction); waters and hydrogens stay isotropic.
- ``tls``: T, L, S per group (``Params.tls_raw``, the Cholesky factor of their joint 6×6
  covariance, so U is positive semi-definite for every atom) plus a residual isotropic B per atom
  (``Params.b_raw``): U = U_TLS(x) + B_res/(8π²)·I (Winn, Isupov & Murshudov 2001, Acta Cryst.
  D57, 122).  Waters are outside every group.
- ``auto``: anisotropic at high resolution with enough data per parameter, TLS + isotropic at
  low resolution, isotropic between (see :func:`choose_adp_model`); the choice and its reason are
  logged.

The ADP restraints act on the total U: the B-similarity restraint of
:mod:`jaxrefine.restraints.adp` on B_eq = 8π²/3·tr U, and for anisotropic atoms rigid bond,
similarity and a weak isotropy pull (:mod:`jaxrefine.restraints.adp_aniso`).
"""
from __future__ import annotations

import logging
from typing import Any, NamedTuple

import numpy as np

from ..io.ncs import find_ncs_copies
from ..io.tls import TlsGroups, read_tls_groups, tls_groups_from_spec
from ..restraints import adp_energy
from ..restraints.adp_aniso import AnisoAdpTerm, aniso_adp_energy, aniso_adp_report, aniso_adp_term
from ..restraints.ncs import NcsTerm, ncs_energy, ncs_report, ncs_term
from ..xray.adp import (
    EIGHT_PI2,
    b_eq,
    cholesky_params,
    tls_cholesky_params,
    tls_from_cholesky,
    u_from_cholesky,
    u_from_tls,
    u_iso6,
)

from ..core.device import array_module
from .params import atom_b, atom_xyz

log = logging.getLogger("jaxrefine")

# automatic choice (REFMAC5/phenix practice: anisotropic U at atomic or near-atomic resolution,
# TLS at medium and low resolution); parameters counted per non-hydrogen atom
# (measured from the shared shaken starts, 5 macrocycles, 2026-12-01: 5orl at 1.69 Å with 1.83 work reflections per
# parameter ends at R-free 0.241 isotropic, 0.233 with TLS and 0.227 anisotropic (servalcat's yardstick: 0.238,
# 0.230, 0.228; servalcat's own isotropic run 0.232); 5e5z at 1.66 Å has 1.0 per parameter and stays isotropic)
ANISO_D_MIN = 1.8  # Å: anisotropic U only at this resolution or better ...
ANISO_MIN_RATIO = 1.8  # ... and with at least this many work reflections per refined parameter
TLS_D_MIN = 2.5  # Å: TLS groups (one per chain) + isotropic B at this resolution or worse
# scale of the minimiser's shifts: a unit shift of a Cholesky factor entry l (Å) changes B by
# about 16π²·l ≈ 50 Å² for l ≈ 0.3 Å; shifts are taken in units that move B by ~1 Å², like b_raw
U_SHIFT_SCALE = 1.0 / (16 * np.pi**2 * 0.3)
TLS_START_T = 0.05  # Å, starting diagonal of the (t, λ) Cholesky factor: T = 0.0025 Å² (B 0.2 Å²)
TLS_START_L = 0.01  # rad: L = 1e-4 rad² (0.33 deg²); a zero factor would have a zero gradient


class AdpModel(NamedTuple):
    """Static arrays of the ADP model (part of the Problem pytree).

    Attributes:
        aniso_index: (n,) int row of ``Params.u_raw`` of each atom, -1 for isotropic atoms.
        tls_group: (n,) int TLS group of each atom, -1 outside every group.
        tls_origin: (g, 3) Å.
        tls_shift_scale: (g, 21) scale of the minimiser's shifts of ``Params.tls_raw``.
        u_min: scalar floor of the anisotropic U's eigenvalues (Å², b_min/(8π²)).
        u_fixed: (n, 6) U (Å²) kept fixed in F_calc (deposited ANISOU shapes of atoms refined
            isotropically; zeros elsewhere).
        restraints: :class:`AnisoAdpTerm` over the anisotropic atoms (empty for iso/tls).
        restraint_weights: (3,) weights of rigid bond, similarity and isotropy.
    """

    aniso_index: Any
    tls_group: Any
    tls_origin: Any
    tls_shift_scale: Any
    u_min: Any
    u_fixed: Any
    restraints: AnisoAdpTerm
    restraint_weights: Any


class AdpChoice(NamedTuple):
    """What :func:`build_adp_model` chose (for the log and the report)."""

    mode: str
    reason: str
    n_aniso: int = 0
    tls: TlsGroups | None = None


class NcsModel(NamedTuple):
    """Local NCS restraints in the problem: the padded term and its weight (relative to E_geometry)."""

    term: NcsTerm
    weight: Any


def parameter_ratio(model, n_work: int, mode: str) -> float:
    """Work reflections per refined parameter (xyz + B, or xyz + U for non-water atoms); waters of occupancy 0
    (the slots kept for water picking, :func:`jaxrefine.problem.setup.with_spare_waters`) are not counted."""
    water = np.asarray(model.kind == "water")
    heavy = ~np.asarray(model.is_hydrogen, bool) & ~(water & (np.asarray(model.occ) <= 0))
    per_atom = 9 if mode == "aniso" else 4
    n_par = per_atom * int((heavy & ~water).sum()) + 4 * int((heavy & water).sum())
    return n_work / max(n_par, 1)


def choose_adp_model(mode: str, d_min: float, n_work: int, model) -> tuple:
    """(mode, reason): ``mode`` itself unless it is ``auto``."""
    if mode != "auto":
        return mode, f"refine.adp={mode}"
    ratio = parameter_ratio(model, n_work, "aniso")
    if d_min <= ANISO_D_MIN and ratio >= ANISO_MIN_RATIO:
        return "aniso", (f"auto: d_min {d_min:.2f} Å <= {ANISO_D_MIN} Å and {ratio:.1f} work reflections per "
                         f"parameter with anisotropic U (>= {ANISO_MIN_RATIO})")
    if d_min >= TLS_D_MIN:
        return "tls", f"auto: d_min {d_min:.2f} Å >= {TLS_D_MIN} Å: TLS groups + isotropic B"
    why = (f"{ratio:.1f} work reflections per parameter with anisotropic U (< {ANISO_MIN_RATIO})"
           if d_min <= ANISO_D_MIN else f"d_min {d_min:.2f} Å between {ANISO_D_MIN} and {TLS_D_MIN} Å")
    return "iso", f"auto: {why}: isotropic B"


def _tls_shift_scale(tls: TlsGroups, xyz_cart) -> np.ndarray:
    """(g, 21): entries of the factor's λ rows (3..5) are scaled by 1/radius of gyration of the group
    (a libration of θ rad moves atoms by ~radius·θ Å), all by U_SHIFT_SCALE."""
    rows = np.array([i for i in range(6)] + [i for i in range(6) for _ in range(i)])
    out = np.full((tls.n_groups, 21), U_SHIFT_SCALE)
    for k in range(tls.n_groups):
        r = xyz_cart[tls.group == k] - tls.origin[k]
        radius = float(np.sqrt((r * r).sum(1).mean())) + 1.0 if len(r) else 1.0
        out[k, rows >= 3] /= radius
    return out


def _tls_start(raw, origin, xyz_cart, group):
    """T, L, S of raw TLS parameters and the U they give the atoms (numpy in, numpy out: no XLA program)."""
    t, l, s = tls_from_cholesky(raw)  # noqa: E741
    return t, l, s, u_from_tls(t, l, s, np.asarray(origin, float), np.asarray(xyz_cart, float), np.asarray(group))


def _start_tls(model, spec: str, b_min: float):
    """Groups, their starting raw parameters and the residual B that keeps each atom's B_eq."""
    tls = read_tls_groups(model) if spec == "auto" else None
    if tls is not None:
        tls = tls._replace(group=np.where(model.kind == "water", -1, tls.group))
        source = "the input model's header"
    else:
        tls = tls_groups_from_spec(model, "chain" if spec == "auto" else spec)
        c = np.diag([TLS_START_T**2] * 3 + [TLS_START_L**2] * 3)
        t6 = [c[0, 0], c[1, 1], c[2, 2], 0.0, 0.0, 0.0]
        l6 = [c[3, 3], c[4, 4], c[5, 5], 0.0, 0.0, 0.0]
        tls = tls._replace(t=np.tile(t6, (tls.n_groups, 1)), l=np.tile(l6, (tls.n_groups, 1)))
        source = "chains" if spec in ("auto", "chain") else f"selections {spec!r}"
    raw = tls_cholesky_params(tls.t, tls.l, tls.s)
    t, l, s, u_tls = _tls_start(raw, tls.origin, model.xyz_cart, tls.group)  # as the raw values give them
    inside = tls.group >= 0
    b_res = model.b_iso - np.asarray(b_eq(u_tls))
    if source.startswith("the input") and np.median(b_res[inside]) < 0:
        # older REFMAC files hold the residual B in the B column (B < B_eq of the TLS part): keep it
        b_res = model.b_iso
        source += " (B column read as residual B)"
    b_res = np.where(inside, b_res, model.b_iso)
    return tls._replace(t=t, l=l, s=s), raw, np.maximum(b_res, b_min + 1.0), source


def build_adp_model(model, mode: str, tls_spec: str, b_min: float, d_min: float, n_work: int,
                    u_shape=None, w_restraints=(1.0, 1.0, 1.0), pairs=None):
    """The ADP model, starting parameters and starting B for a refinement.

    Args:
        model: :class:`jaxrefine.io.model.Model`.
        mode: iso | aniso | tls | auto.
        tls_spec: "auto" (the input's TLS groups, else one per chain), "chain" or selections.
        b_min: floor of B (Å²).
        d_min: resolution of the data (Å); n_work: work reflections (for ``auto``).
        u_shape: (n, 6) trace-free deposited ANISOU shapes kept in F_calc for atoms refined
            isotropically (``refine.keep_anisou``), or None.
        w_restraints: weights of rigid bond, similarity and isotropy restraints.
        pairs: ((k, 2) bonded pairs, (m, 2) 1-3 pairs) for the anisotropic restraints.

    Returns:
        (AdpModel or None for iso, u_raw (n_aniso, 6) or None, tls_raw (g, 21) or None,
        b_start (n,) Å², AdpChoice)
    """
    mode, reason = choose_adp_model(mode, d_min, n_work, model)
    b_start = np.asarray(model.b_iso, float)
    if mode == "iso":
        return None, None, None, b_start, AdpChoice(mode, reason)
    n = model.n_atoms
    u_min = b_min / EIGHT_PI2
    has_aniso = np.asarray(model.has_aniso, bool)
    u_fixed = np.zeros((n, 6)) if u_shape is None else np.asarray(u_shape, float)
    tls_group, origin, scale, u_raw, tls_raw, tls = np.full(n, -1, np.int32), np.zeros((0, 3)), np.zeros((0, 21)), None, None, None
    aniso = np.zeros(n, bool)
    if mode == "aniso":
        aniso = ~np.asarray(model.is_hydrogen, bool) & (model.kind != "water")
        u0 = np.where(has_aniso[:, None], model.u_aniso, u_iso6(np.maximum(np.asarray(b_start, float), b_min + 1.0)))
        u_raw = cholesky_params(u0[aniso], u_min=u_min, eig_floor=1e-4)
        u_fixed = np.where(aniso[:, None], 0.0, u_fixed)
        reason += f"; {int(aniso.sum())} atoms anisotropic"
    else:
        tls, tls_raw, b_start, source = _start_tls(model, tls_spec, b_min)
        tls_group, origin, scale = tls.group, tls.origin, _tls_shift_scale(tls, model.xyz_cart)
        u_fixed = np.where((tls_group >= 0)[:, None], 0.0, u_fixed)
        reason += f"; {tls.n_groups} TLS groups from {source}"
    p12, p13 = pairs if pairs is not None else (np.zeros((0, 2), int), np.zeros((0, 2), int))
    adp = AdpModel(
        aniso_index=np.where(aniso, np.cumsum(aniso) - 1, -1).astype(np.int32),
        tls_group=np.asarray(tls_group, np.int32), tls_origin=np.asarray(origin, float),
        tls_shift_scale=np.asarray(scale, float), u_min=np.asarray(u_min),
        u_fixed=np.asarray(u_fixed, float), restraints=aniso_adp_term(p12, p13, aniso, iso_pull=None),
        restraint_weights=np.asarray(w_restraints, float),
    )
    return adp, u_raw, tls_raw, b_start, AdpChoice(mode, reason, int(aniso.sum()), tls)


def atom_adp(b_iso, u_raw, tls_raw, xyz_cart, adp: AdpModel | None, u_shape=None):
    """The ADPs F_calc needs, and every atom's total U.

    Args:
        b_iso: (n,) B from ``Params.b_raw`` (Å²): isotropic B, or the residual B of TLS atoms.
        u_raw, tls_raw: ``Params.u_raw`` / ``Params.tls_raw`` (None when not refined).
        xyz_cart: (n, 3) Å (the TLS part depends on the position).
        adp: the problem's ADP model, None for ``iso``.
        u_shape: the iso model's fixed ANISOU shapes (Problem.u_shape) or None.

    Returns:
        b_sf (n,) Å² and u_sf (n, 6) Å² or None, in the convention of
        :func:`jaxrefine.xray.structure_factors.structure_factors` (U = u_sf + b_sf/(8π²)·I);
        u_total (n, 6) Å².
    """
    if adp is None:
        u_total = u_iso6(b_iso) if u_shape is None else u_iso6(b_iso) + u_shape
        return b_iso, u_shape, u_total
    xp = array_module(b_iso, u_raw, tls_raw, xyz_cart, adp)  # numpy: the setup's start (no XLA program)
    u = xp.asarray(adp.u_fixed, b_iso.dtype)
    b_sf = b_iso
    if u_raw is not None and u_raw.shape[0]:
        idx = adp.aniso_index
        u_an = u_from_cholesky(u_raw, adp.u_min)[xp.maximum(idx, 0)]
        u = u + xp.where((idx >= 0)[:, None], u_an, 0.0)
        b_sf = xp.where(idx >= 0, 0.0, b_iso)
    if tls_raw is not None and tls_raw.shape[0]:
        t, l, s = tls_from_cholesky(tls_raw)
        u = u + u_from_tls(t, l, s, adp.tls_origin, xyz_cart, adp.tls_group)
    return b_sf, u, u + u_iso6(b_sf)


def build_ncs(model, mode: str, weight: float):
    """Local NCS restraints for ``restraints.ncs`` = auto (copies found by sequence) or off.

    Returns:
        (NcsModel or None, list of NcsCopies) — None when off or when there are no copies.
    """
    if mode == "off":
        return None, []
    copies = find_ncs_copies(model)
    if not copies:
        return None, []
    term = ncs_term(model.xyz_cart, [(c.atoms1, c.atoms2) for c in copies])
    return NcsModel(term=term, weight=np.asarray(float(weight))), copies


def ncs_log_lines(ncs: NcsModel | None, copies) -> list:
    """One line per pair of copies: chains, matched atoms and restraint pairs."""
    if ncs is None:
        return []
    which = np.asarray(ncs.term.copy_pair)[np.asarray(ncs.term.mask) > 0]
    return [f"NCS {c.name}: {len(c.atoms1)} matched atoms, {int((which == k).sum())} local distance restraints "
            f"(sequence identity {100 * c.identity:.0f}%)" for k, c in enumerate(copies)]


def adp_of(params, problem):
    """(b_sf, u_sf, u_total) of :func:`atom_adp` for the parameters of a problem."""
    u_raw, tls_raw = getattr(params, "u_raw", None), getattr(params, "tls_raw", None)
    xyz = atom_xyz(params, problem.maps)[0] if tls_raw is not None else None
    return atom_adp(atom_b(params, problem.maps), u_raw, tls_raw, xyz, problem.adp, problem.u_shape)


def adp_restraint_energy(params, problem):
    """E_ADP (unweighted by w_B): B similarity on each atom's B_eq, plus rigid bond, similarity and
    isotropy of the anisotropic atoms' U."""
    if problem.adp is None:
        return adp_energy(atom_b(params, problem.maps), problem.restraints, 1.0)
    _, _, u_total = adp_of(params, problem)
    e = adp_energy(b_eq(u_total), problem.restraints, 1.0)
    if params.u_raw is not None and params.u_raw.shape[0]:
        w = problem.adp.restraint_weights
        e = e + aniso_adp_energy(atom_xyz(params, problem.maps)[0], u_total, problem.adp.restraints, (w[0], w[1], w[2]))
    return e


def ncs_restraint_energy(params, problem):
    """Weighted local NCS energy (0 without NCS); part of E_geometry."""
    if problem.ncs is None:
        return 0.0
    return problem.ncs.weight * ncs_energy(atom_xyz(params, problem.maps)[0], problem.ncs.term)


def refined_tls(params, problem, choice: AdpChoice) -> TlsGroups | None:
    """The TLS groups of ``choice`` with the tensors of ``params`` (numpy), or None."""
    if choice is None or choice.tls is None or params.tls_raw is None:
        return None
    t, l, s = tls_from_cholesky(np.asarray(params.tls_raw, float))  # numpy: no XLA program for the writers
    return choice.tls._replace(t=t, l=l, s=s)


def adp_ncs_statistics(xyz_cart, u_total, adp: AdpModel | None, ncs: NcsModel | None, copies) -> dict:
    """Report entries (plain numbers): ``ncs`` per pair of copies (restraints, RMS and largest
    distance difference, Å) and ``adp_restraints`` (rigid-bond and neighbour-U RMS, Å²) when there
    are anisotropic atoms; empty dict when neither applies.

    Args:
        xyz_cart: (n, 3) Å; u_total: (n, 6) Å² total U (or None); adp, ncs: the problem's models
        (None when off); copies: the :class:`jaxrefine.io.ncs.NcsCopies` of ``ncs``.
    """
    out = {}
    if ncs is not None:
        out["ncs"] = ncs_report(xyz_cart, ncs.term, [c.name for c in copies])
    if adp is not None and u_total is not None and (np.asarray(adp.aniso_index) >= 0).any():
        out["adp_restraints"] = aniso_adp_report(xyz_cart, u_total, adp.restraints)
    return out


def model_adp_ncs_statistics(model, restraints) -> dict:
    """:func:`adp_ncs_statistics` of a model as read: NCS between the copies found by sequence,
    rigid-bond and U similarity over bonded pairs of atoms with ANISOU (for ``jaxrefine geometry``)."""
    ncs, copies = build_ncs(model, "auto", 1.0)
    aniso = np.asarray(model.has_aniso, bool)
    adp = u = None
    if aniso.any():
        bond, angle = restraints.bond, restraints.angle
        term = aniso_adp_term(np.asarray(bond.idx)[np.asarray(bond.mask) > 0],
                              np.asarray(angle.idx)[np.asarray(angle.mask) > 0][:, [0, 2]], aniso)
        adp = AdpModel(np.where(aniso, 0, -1), None, None, None, None, None, term, None)
        u = np.where(aniso[:, None], model.u_aniso, u_iso6(np.asarray(model.b_iso, float)))
    return adp_ncs_statistics(model.xyz_cart, u, adp, ncs, copies)


def statistics_lines(stats: dict) -> list:
    """Text lines of :func:`adp_ncs_statistics` for logs and the geometry command."""
    lines = [f"NCS {r['copies']}: {r['n_pairs']} restrained distances, RMS difference {r['rms_delta']:.3f} Å, "
             f"largest {r['max_delta']:.2f} Å" for r in stats.get("ncs", [])]
    a = stats.get("adp_restraints")
    if a:
        lines.append(f"ADP restraints: {a['n_pairs']} pairs, RMS rigid-bond difference {a['rms_rigid_bond']:.4f} Å², "
                     f"RMS neighbour U difference {a['rms_similarity']:.4f} Å²")
    return lines
