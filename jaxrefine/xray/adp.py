"""Anisotropic displacement parameters: a positive-definite parametrisation and the TLS model.

Conventions: ``u_aniso`` (n, 6) is the Cartesian U of PDB ANISOU records, U11 U22 U33 U12 U13
U23 (Å²); B_eq = 8π²/3 · tr U (Å²).  TLS tensors are in Å² (T), rad² (L) and Å·rad (S), with
the origin in Å; the files' degree units are converted in :mod:`jaxrefine.io.tls`.

- :func:`u_from_cholesky`: U = L·Lᵀ + u_min·I with L lower triangular, its diagonal
  softplus(raw) > 0, so every parameter vector gives a positive-definite U whose smallest
  eigenvalue is at least ``u_min`` (the Cholesky parametrisation of Pinheiro & Bates 1996,
  Stat. Comput. 6, 289, "Unconstrained parametrizations for variance-covariance matrices").
- :func:`cholesky_params`: its inverse (numpy), for starting values from ANISOU or B.
- :func:`tls_from_cholesky`: T, L, S of a group from the Cholesky factor of their joint 6×6
  covariance, so that every atom's U from TLS is positive semi-definite.
- :func:`u_from_tls`: U = T + A·L·Aᵀ + A·S + Sᵀ·Aᵀ with A the antisymmetric matrix of the
  atom's position r relative to the group origin (Schomaker & Trueblood 1968, Acta Cryst. B24, 63;
  Winn, Isupov & Murshudov 2001, Acta Cryst. D57, 122, eq. 2).

Pure JAX, and numpy for numpy input (:func:`jaxrefine.core.device.array_module`: the setup's starting ADPs and the
writers' TLS tensors on the host with no XLA program); the inverse maps are numpy.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..core.device import array_module
from .structure_factors import _u6_to_mat as u6_to_matrix

EIGHT_PI2 = 8.0 * np.pi**2


def matrix_to_u6(m):
    """(..., 3, 3) symmetric -> (..., 6) U11 U22 U33 U12 U13 U23."""
    entries = [m[..., 0, 0], m[..., 1, 1], m[..., 2, 2], m[..., 0, 1], m[..., 0, 2], m[..., 1, 2]]
    return array_module(m).stack(entries, -1)


def b_eq(u_aniso):
    """(n,) equivalent isotropic B = 8π²/3 · (U11 + U22 + U33) (Å²); u_aniso (n, 6) Å²."""
    return EIGHT_PI2 / 3.0 * (u_aniso[..., 0] + u_aniso[..., 1] + u_aniso[..., 2])


def u_iso6(b_iso):
    """(n, 6) U = B/(8π²)·I of isotropic atoms; b_iso (n,) Å² (numpy in, numpy out)."""
    xp = array_module(b_iso)
    u = b_iso / EIGHT_PI2
    z = xp.zeros_like(u)
    return xp.stack([u, u, u, z, z, z], -1)


def _lower_indices(k: int):
    """Rows and columns of a k×k lower triangle: the diagonal first, then row by row below it."""
    pairs = [(i, i) for i in range(k)] + [(i, j) for i in range(k) for j in range(i)]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def lower_factor(raw, k: int):
    """(..., k, k) lower-triangular factor from (..., k(k+1)/2) raw parameters: the k diagonal
    entries through softplus (> 0), then the entries below the diagonal row by row."""
    rows, cols = _lower_indices(k)
    if array_module(raw) is np:  # softplus(x) = log(1 + e^x)
        out = np.zeros(raw.shape[:-1] + (k, k), raw.dtype)
        out[..., rows, cols] = np.concatenate([np.logaddexp(0.0, raw[..., :k]), raw[..., k:]], -1)
        return out
    vals = jnp.concatenate([jax.nn.softplus(raw[..., :k]), raw[..., k:]], -1)
    return jnp.zeros(raw.shape[:-1] + (k, k), raw.dtype).at[..., rows, cols].set(vals)


def _softplus_inv(x):
    x = np.asarray(x, float)
    return np.where(x > 30, x, np.log(np.expm1(np.minimum(x, 30))))


def lower_factor_params(m, eig_floor):
    """Inverse of :func:`lower_factor` composed with F·Fᵀ (numpy): raw parameters of the Cholesky
    factor of the symmetric (..., k, k) ``m``, its eigenvalues first raised to ``eig_floor``."""
    m = np.asarray(m, float)
    w, v = np.linalg.eigh(m)
    m = np.einsum("...ij,...j,...kj->...ik", v, np.maximum(w, eig_floor), v)
    rows, cols = _lower_indices(m.shape[-1])
    raw = np.linalg.cholesky(m)[..., rows, cols]
    k = m.shape[-1]
    raw[..., :k] = _softplus_inv(raw[..., :k])
    return raw


def u_from_cholesky(chol_raw, u_min=0.0):
    """(n, 6) positive-definite U (Å²) from (n, 6) unconstrained parameters.

    Args:
        chol_raw: (n, 6) raw parameters: softplus⁻¹ of L11, L22, L33, then L21, L31, L32 (Å).
        u_min: scalar floor added to every eigenvalue (Å²), e.g. b_min/(8π²).
    """
    xp = array_module(chol_raw, u_min)
    lf = lower_factor(chol_raw, 3)
    u = xp.einsum("nij,nkj->nik", lf, lf)
    return matrix_to_u6(u) + u_min * xp.asarray([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], u.dtype)


def cholesky_params(u_aniso, u_min=0.0, eig_floor=1e-4):
    """Inverse of :func:`u_from_cholesky` (numpy): raw parameters reproducing ``u_aniso``.

    Eigenvalues of U − u_min·I below ``eig_floor`` (Å²) are raised to it first, so a deposited
    ANISOU that is not positive definite (or is at the floor) still gets finite parameters.

    Args:
        u_aniso: (n, 6) U (Å²).
        u_min: the floor used in :func:`u_from_cholesky`.
        eig_floor: smallest eigenvalue kept (Å²).

    Returns:
        (n, 6) float64 raw parameters.
    """
    u = np.asarray(u6_to_matrix(np.asarray(u_aniso, float)), float) - u_min * np.eye(3)
    return lower_factor_params(u, eig_floor)


def tls_from_cholesky(tls_raw):
    """T (g, 6) Å², L (g, 6) rad², S (g, 3, 3) Å·rad from (g, 21) raw parameters.

    The 6×6 covariance of (t, λ) — translation and libration of the rigid group — is
    C = [[T, Sᵀ], [S, L]] (S_ij = <λ_i t_j>); every atom's U = [I A]·C·[I A]ᵀ (see
    :func:`u_from_tls`), so a positive semi-definite C gives a positive semi-definite U for every
    atom position.  C = F·Fᵀ with F from :func:`lower_factor` guarantees it.
    """
    f = lower_factor(tls_raw, 6)
    c = array_module(tls_raw).einsum("gij,gkj->gik", f, f)
    return matrix_to_u6(c[:, :3, :3]), matrix_to_u6(c[:, 3:, 3:]), c[:, 3:, :3]


def tls_cholesky_params(t, l, s, eig_floor=1e-10):  # noqa: E741 (L is the field's name)
    """Inverse of :func:`tls_from_cholesky` (numpy); C's eigenvalues below ``eig_floor`` are raised.

    The floor is tiny: a refined C can have an eigenvalue near 0, and raising it by δ changes U by
    up to δ·r² (r ≈ 20 Å from the origin), so 1e-6 would already move U by 4e-4 Å²."""
    tm = np.asarray(u6_to_matrix(np.asarray(t, float)))
    lm = np.asarray(u6_to_matrix(np.asarray(l, float)))
    s = np.asarray(s, float)
    c = np.concatenate([np.concatenate([tm, np.swapaxes(s, -1, -2)], -1), np.concatenate([s, lm], -1)], -2)
    return lower_factor_params(c, eig_floor)


def tls_shift_matrix(r):
    """(n, 3, 3) A of Winn et al. 2001 eq. 2 for positions r (n, 3) relative to the origin (Å).

    A = [[0, z, −y], [−z, 0, x], [y, −x, 0]]: a small libration λ (rad) moves the atom by
    λ × r = A·λ, so with u = t + A·λ and S_ij = <λ_i t_j>: U = T + A L Aᵀ + A S + Sᵀ Aᵀ.
    """
    xp = array_module(r)
    x, y, z = r[..., 0], r[..., 1], r[..., 2]
    o = xp.zeros_like(x)
    return xp.stack([xp.stack([o, z, -y], -1), xp.stack([-z, o, x], -1), xp.stack([y, -x, o], -1)], -2)


def u_from_tls(t, l, s, origin, xyz_cart, group):
    """(n, 6) U (Å²) of atoms from the TLS tensors of their groups.

    Args:
        t: (g, 6) T (Å², U11 … U23 order).
        l: (g, 6) L (rad², same order).
        s: (g, 3, 3) S (Å·rad), S[i, j] = S_ij.
        origin: (g, 3) group origins (Å).
        xyz_cart: (n, 3) atom positions (Å).
        group: (n,) int group of each atom; atoms outside every group (-1) get U = 0.

    Reference: Winn, Isupov & Murshudov 2001, Acta Cryst. D57, 122, eq. 2.
    """
    xp = array_module(t, l, s, origin, xyz_cart)
    g = xp.maximum(group, 0)
    a = tls_shift_matrix(xyz_cart - xp.asarray(origin)[g])
    lm = u6_to_matrix(xp.asarray(l))[g]
    sm = xp.asarray(s)[g]
    asm = xp.einsum("nij,njk->nik", a, sm)
    u = u6_to_matrix(xp.asarray(t))[g] + xp.einsum("nij,njk,nlk->nil", a, lm, a) + asm + xp.swapaxes(asm, -1, -2)
    return xp.where((group >= 0)[:, None], matrix_to_u6(u), 0.0)
