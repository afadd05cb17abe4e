"""Geometry report: counts, RMS deviations, RMS Z, worst outliers and clashes.

RMS deviation of a type = sqrt(mean((x − ideal)²)) over its restraints (Å, degrees, Å³; for
planes over all plane atoms' distances to their least-squares plane); RMS Z = sqrt(mean(z²)) with
z = (x − ideal)/σ — the statistics that REFMAC5 and servalcat print.  A clash is a non-bonded
pair (not 1-4) overlapping by ≥ 0.4 Å (d ≤ d_min − 0.4; the MolProbity threshold, Word et al. 1999, J. Mol.
Biol. 285, 1735).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import jax
import numpy as np

from .bonds import bond_angles, bond_lengths
from .chirals import chiral_targets, chiral_volumes
from .nonbonded import NonbondedList, pair_distances
from .planes import plane_distances
from ..core.restraint_terms import Restraints
from .torsions import torsion_deviations

CLASH_OVERLAP = 0.4  # Å (MolProbity)
OUTLIER_Z = 4.0  # |z| above which a restraint is listed as an outlier
N_WORST = 10
MAX_CLASHES_LISTED = 50  # the worst clashes kept in the report (a badly placed model can have thousands)


@dataclass(frozen=True)
class GeometryReport:
    """Geometry statistics of one model (see module docstring); ``as_dict()`` for JSON."""

    n_bonds: int
    n_angles: int
    n_torsions: int
    n_planes: int
    n_chirals: int
    n_nonbonded: int
    n_clashes: int
    rms_bond: float
    rms_angle: float
    rms_torsion: float
    rms_plane: float
    rms_chiral: float
    rms_z_bond: float
    rms_z_angle: float
    rms_z_torsion: float
    rms_z_plane: float
    rms_z_chiral: float
    n_chiral_wrong_sign: int
    outliers: dict = field(default_factory=dict)
    clashes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _values(xyz_cart, restraints: Restraints, nonbonded):
    """All per-restraint geometric values, by the energy's own functions run in numpy (numpy arguments: no XLA
    program to compile or load; see :func:`jaxrefine.core.device.array_module`)."""
    out = {
        "bond": bond_lengths(xyz_cart, restraints.bond),
        "angle": bond_angles(xyz_cart, restraints.angle),
        "torsion": torsion_deviations(xyz_cart, restraints.torsion),
        "plane": plane_distances(xyz_cart, restraints.plane),
        "chiral": chiral_volumes(xyz_cart, restraints.chiral),
    }
    out["chiral_target"] = chiral_targets(out["chiral"], restraints.chiral)
    if nonbonded is not None:
        out["pair"] = pair_distances(xyz_cart, nonbonded)
    return out


def _label(model, i):
    i = int(i)
    if model is None:
        return f"atom {i}"
    alt = f".{model.altloc[i]}" if model.altloc[i] else ""
    ic = model.icode[i] if hasattr(model, "icode") else ""
    return f"{model.chain_id[i]}/{model.res_name[i]} {model.res_seq[i]}{ic}/{model.atom_name[i]}{alt}"


def _rms(x):
    x = np.asarray(x, float)
    return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


def _worst(idx, value, ideal, z, model, scale=1.0):
    order = np.argsort(-np.abs(z))[:N_WORST]
    return [
        {"atoms": [_label(model, a) for a in idx[k]], "value": float(value[k] * scale), "ideal": float(ideal[k] * scale), "z": float(z[k])}
        for k in order
        if abs(z[k]) > OUTLIER_Z
    ]


def _plane_outliers(pidx, atom_mask, dist, z_plane, model) -> list:
    """The worst planes with RMS Z above OUTLIER_Z: atoms, RMS distance to the plane (Å), Z."""
    return [
        {"atoms": [_label(model, i) for i, ok in zip(pidx[k], atom_mask[k]) if ok],
         "rms_distance": float(np.sqrt(np.mean(dist[k][atom_mask[k]] ** 2))), "z": float(z_plane[k])}
        for k in np.argsort(-z_plane)[:N_WORST]
        if z_plane[k] > OUTLIER_Z
    ]


def _clashes(nonbonded: NonbondedList, pair_distance, model):
    """(clashes sorted by overlap, number of listed pairs): pairs closer than d_min − CLASH_OVERLAP,
    1-4 pairs left out (torsion-controlled), symmetry contacts once."""
    w = np.asarray(nonbonded.weight) > 0
    dnb = pair_distance[w]
    dmin = np.asarray(nonbonded.d_min)[w]
    ii, jj = np.asarray(nonbonded.i)[w], np.asarray(nonbonded.j)[w]
    sym = np.asarray(nonbonded.weight)[w] < 1
    not14 = np.asarray(nonbonded.kind)[w] != 1  # 1-4 contacts are torsion-controlled, not clashes
    clashes = []
    for k in np.nonzero((dmin - dnb >= CLASH_OVERLAP) & not14)[0]:
        if sym[k] and ii[k] > jj[k]:
            continue  # a symmetry contact is listed from both sides; report it once
        clashes.append({"atoms": [_label(model, ii[k]), _label(model, jj[k])], "distance": float(dnb[k]),
                        "d_min": float(dmin[k]), "symmetry": bool(sym[k])})
    clashes.sort(key=lambda x: x["distance"] - x["d_min"])
    return clashes, int(w.sum())


def geometry_report(xyz_cart, restraints: Restraints, nonbonded: NonbondedList | None = None, model=None) -> GeometryReport:
    """Statistics of the model's deviations from its restraints.

    Args:
        xyz_cart: (n, 3) Cartesian coordinates (Å).
        restraints: from :func:`jaxrefine.io.topology.build_restraints`.
        nonbonded: pair list for clashes (None: no clash statistics).
        model: the Model, for residue labels of outliers (None: atom indices).
    """
    xyz = np.asarray(xyz_cart, float)
    vals = _values(xyz, *jax.tree_util.tree_map(np.asarray, (restraints, nonbonded)))
    deg = 180.0 / np.pi
    out = {}

    def real(term):
        return np.asarray(term.mask) > 0

    b = restraints.bond
    m = real(b)
    d = vals["bond"][m]
    ideal, sig, idx = np.asarray(b.ideal)[m], np.asarray(b.sigma)[m], np.asarray(b.idx)[m]
    zb = (d - ideal) / sig
    out["bond"] = _worst(idx, d, ideal, zb, model)
    rms_bond = _rms(d - ideal)

    a = restraints.angle
    m = real(a)
    th = vals["angle"][m]
    ideal, sig, idx = np.asarray(a.ideal)[m], np.asarray(a.sigma)[m], np.asarray(a.idx)[m]
    za = (th - ideal) / sig
    out["angle"] = _worst(idx, th, ideal, za, model, deg)
    rms_angle = _rms(th - ideal) * deg

    t = restraints.torsion
    m = real(t)
    dt = vals["torsion"][m]
    zt = dt / np.asarray(t.sigma)[m]
    idx, ideal = np.asarray(t.idx)[m], np.asarray(t.ideal)[m]
    out["torsion"] = _worst(idx, ideal + dt, ideal, zt, model, deg)
    rms_torsion = _rms(dt) * deg

    p = restraints.plane
    m = real(p)
    dist = vals["plane"][m]
    am = np.asarray(p.atom_mask)[m] > 0
    sig = np.asarray(p.sigma)[m]
    zp_atoms = (dist / sig[:, None])[am]
    rms_plane = _rms(dist[am])
    zp_plane = np.sqrt(np.sum(np.where(am, dist / sig[:, None], 0.0) ** 2, axis=1) / am.sum(1))
    out["plane"] = _plane_outliers(np.asarray(p.idx)[m], am, dist, zp_plane, model)

    c = restraints.chiral
    m = real(c)
    v = vals["chiral"][m]
    target = vals["chiral_target"][m]
    zc = (v - target) / np.asarray(c.sigma)[m]
    out["chiral"] = _worst(np.asarray(c.idx)[m], v, target, zc, model)
    sign = np.asarray(c.sign)[m]
    wrong = int(np.sum((sign != 0) & (np.sign(v) != sign)))

    clashes, n_nb = ([], 0) if nonbonded is None else _clashes(nonbonded, vals["pair"], model)

    return GeometryReport(
        n_bonds=int(zb.size), n_angles=int(za.size), n_torsions=int(zt.size), n_planes=int(real(p).sum()),
        n_chirals=int(zc.size), n_nonbonded=n_nb, n_clashes=len(clashes),
        rms_bond=rms_bond, rms_angle=rms_angle, rms_torsion=rms_torsion, rms_plane=rms_plane, rms_chiral=_rms(v - target),
        rms_z_bond=_rms(zb), rms_z_angle=_rms(za), rms_z_torsion=_rms(zt), rms_z_plane=_rms(zp_atoms), rms_z_chiral=_rms(zc),
        n_chiral_wrong_sign=wrong, outliers=out, clashes=clashes[:MAX_CLASHES_LISTED],
    )
