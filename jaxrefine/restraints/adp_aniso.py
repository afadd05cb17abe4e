"""Restraints on anisotropic displacement parameters (U, Cartesian Å², U11 U22 U33 U12 U13 U23).

Three terms, the ones SHELXL (Sheldrick 2008, Acta Cryst. A64, 112) and REFMAC5 (Murshudov et
al. 2011, Acta Cryst. D67, 355, §2.5) use, each in the harmonic form ``Σ mask (x/σ)²`` of the
other restraints:

- rigid bond (Hirshfeld 1976, Acta Cryst. A32, 239; SHELXL DELU/RIGU): two bonded atoms move
  by the same mean-square amount along their bond, z = (eᵀU_i e − eᵀU_j e)/σ with e = the unit
  bond vector;
- similarity of neighbours (SHELXL SIMU): Σ_kl (U_i − U_j)_kl² / σ² (Frobenius norm, so every
  off-diagonal element counts twice);
- isotropy (SHELXL ISOR): Σ_kl (U − U_eq·I)_kl² / σ², a weak pull toward a sphere, meant for
  atoms the data determine poorly (waters, atoms at high B); the mask chooses them.

Isotropic atoms take part with U = B/(8π²)·I (see :func:`jaxrefine.xray.adp.u_iso6`): a rigid
bond between an anisotropic and an isotropic atom restrains the anisotropic one.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from ..core.device import array_module
from ..core.restraint_terms import pad_rows, padded_length

SIGMA_RIGID = 0.004  # Å², SHELXL RIGU default s1 (1-2 pairs); 1-3 pairs get twice this
SIGMA_SIM = 0.04  # Å², SHELXL SIMU default (1-2); 1-3 pairs get twice this
SIGMA_ISO = 0.1  # Å², SHELXL ISOR default


class AnisoAdpTerm(NamedTuple):
    """Padded pair and atom restraints on U.

    Attributes:
        idx: (npair, 2) int atom pairs (bonded and 1-3 neighbours).
        sigma_rigid: (npair,) Å² σ of the rigid-bond difference.
        sigma_sim: (npair,) Å² σ of the similarity term.
        mask: (npair,) 1.0 real, 0.0 padding.
        sigma_iso: (n_atoms,) Å² σ of the isotropy pull per atom.
        iso_mask: (n_atoms,) 1.0 where the isotropy pull applies.
    """

    idx: np.ndarray
    sigma_rigid: np.ndarray
    sigma_sim: np.ndarray
    mask: np.ndarray
    sigma_iso: np.ndarray
    iso_mask: np.ndarray


def aniso_adp_term(pairs_12, pairs_13, aniso, iso_pull=None) -> AnisoAdpTerm:
    """Build the padded term (numpy) from neighbour lists.

    Args:
        pairs_12: (k, 2) int bonded pairs.
        pairs_13: (m, 2) int 1-3 pairs (ends of bond angles).
        aniso: (n_atoms,) bool, atoms with refined anisotropic U; only pairs with at least one
            such atom are kept (isotropic–isotropic pairs are the B restraint's business).
        iso_pull: (n_atoms,) bool atoms pulled toward isotropy, or None for none.
    """
    aniso = np.asarray(aniso, bool)
    p12 = np.asarray(pairs_12, np.int64).reshape(-1, 2)
    p13 = np.asarray(pairs_13, np.int64).reshape(-1, 2)
    pairs = np.concatenate([p12, p13])
    scale = np.concatenate([np.ones(len(p12)), np.full(len(p13), 2.0)])
    keep = aniso[pairs[:, 0]] | aniso[pairs[:, 1]] if len(pairs) else np.zeros(0, bool)
    pairs, scale = pairs[keep], scale[keep]
    # one restraint per unordered pair (a 1-3 pair inside a ring can also be listed twice)
    key = np.sort(pairs, axis=1)
    _, first = np.unique(key, axis=0, return_index=True) if len(key) else (None, np.zeros(0, np.int64))
    first = np.sort(first)
    pairs, scale = pairs[first], scale[first]
    n = padded_length(len(pairs))
    n_atoms = aniso.shape[0]
    pull = np.zeros(n_atoms, bool) if iso_pull is None else np.asarray(iso_pull, bool)
    return AnisoAdpTerm(
        idx=pad_rows(pairs.astype(np.int32), n),
        sigma_rigid=pad_rows(SIGMA_RIGID * scale, n, 1.0),
        sigma_sim=pad_rows(SIGMA_SIM * scale, n, 1.0),
        mask=pad_rows(np.ones(len(pairs)), n),
        sigma_iso=np.full(n_atoms, SIGMA_ISO),
        iso_mask=pull.astype(float),
    )


def _frobenius2(d6):
    """Σ_kl D_kl² of symmetric matrices given as (..., 6) (numpy or JAX arrays)."""
    return (d6[..., :3] ** 2).sum(-1) + 2.0 * (d6[..., 3:] ** 2).sum(-1)


def msd_along(u6, e):
    """(k,) mean-square displacement eᵀ U e (Å²) of U (k, 6) along unit vectors e (k, 3)."""
    u11, u22, u33, u12, u13, u23 = (u6[..., k] for k in range(6))
    x, y, z = e[..., 0], e[..., 1], e[..., 2]
    return u11 * x * x + u22 * y * y + u33 * z * z + 2.0 * (u12 * x * y + u13 * x * z + u23 * y * z)


def rigid_bond_deltas(xyz_cart, u_aniso, term: AnisoAdpTerm):
    """(npair,) eᵀ(U_i − U_j)e (Å²) along each pair's unit vector; xyz_cart (n, 3) Å, u_aniso (n, 6) Å² (numpy
    coordinates and term: numpy, for reports; else JAX)."""
    xp = array_module(xyz_cart, u_aniso, term)
    i, j = term.idx[:, 0], term.idx[:, 1]
    d = xyz_cart[i] - xyz_cart[j]
    # padding rows point at atom 0 twice: add 1 under the root so the norm (and its gradient) is finite
    e = d / xp.sqrt(xp.sum(d * d, -1) + (1.0 - term.mask))[:, None]
    return msd_along(u_aniso[i] - u_aniso[j], e)


def rigid_bond_energy(xyz_cart, u_aniso, term: AnisoAdpTerm):
    """Σ mask (eᵀ(U_i − U_j)e / σ_rigid)² (dimensionless)."""
    z = rigid_bond_deltas(xyz_cart, u_aniso, term) / term.sigma_rigid
    return jnp.sum(term.mask * z * z)


def similarity_energy(u_aniso, term: AnisoAdpTerm):
    """Σ mask ‖U_i − U_j‖²_F / σ_sim²."""
    d = u_aniso[term.idx[:, 0]] - u_aniso[term.idx[:, 1]]
    return jnp.sum(term.mask * _frobenius2(d) / term.sigma_sim**2)


def anisotropy(u_aniso):
    """(n, 6) U − U_eq·I (Å²), U_eq = tr U / 3: the part the isotropy pull acts on."""
    ueq = jnp.sum(u_aniso[..., :3], -1, keepdims=True) / 3.0
    return u_aniso - ueq * jnp.asarray([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], u_aniso.dtype)


def isotropy_energy(u_aniso, term: AnisoAdpTerm):
    """Σ iso_mask ‖U − U_eq·I‖²_F / σ_iso²."""
    return jnp.sum(term.iso_mask * _frobenius2(anisotropy(u_aniso)) / term.sigma_iso**2)


def aniso_adp_energy(xyz_cart, u_aniso, term: AnisoAdpTerm, weights=(1.0, 1.0, 1.0)):
    """Weighted sum of rigid-bond, similarity and isotropy energies; weights (rigid, sim, iso)."""
    w_r, w_s, w_i = weights
    return (w_r * rigid_bond_energy(xyz_cart, u_aniso, term) + w_s * similarity_energy(u_aniso, term)
            + w_i * isotropy_energy(u_aniso, term))


def aniso_adp_report(xyz_cart, u_aniso, term: AnisoAdpTerm) -> dict:
    """RMS of the rigid-bond deltas and of the neighbour differences (Å², numpy floats).

    Host code, in numpy: run op by op in JAX it compiled ~20 one-operation programs at the end of a refinement.
    """
    m = np.asarray(term.mask) > 0
    n = int(m.sum())
    if n == 0:
        return {"n_pairs": 0, "rms_rigid_bond": 0.0, "rms_similarity": 0.0}
    term = AnisoAdpTerm(*(np.asarray(v) for v in term))
    u = np.asarray(u_aniso, float)
    rb = rigid_bond_deltas(np.asarray(xyz_cart, float), u, term)[m]
    sim = _frobenius2(u[term.idx[m, 0]] - u[term.idx[m, 1]]) / 9.0  # mean square of the 9 matrix elements
    return {"n_pairs": n, "rms_rigid_bond": float(np.sqrt(np.mean(rb**2))),
            "rms_similarity": float(np.sqrt(np.mean(sim)))}
