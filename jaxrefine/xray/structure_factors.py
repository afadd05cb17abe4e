"""Structure factors F_calc(hkl) as pure JAX functions.

F(h) = Σ_j occ_j f0_j(s) exp(−B_j s²/4) Σ_ops exp(2πi h·(R_op x_j + t_op))

(International Tables Vol. B, ch. 1.2, eq. 1.2.7.1 with the isotropic Debye–Waller factor.)
All operators of the space group, centring included, are summed, so F is the structure factor
of the whole unit cell.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .formfactors import FormFactors, f0

TWO_PI = 2.0 * np.pi


class SymOps(NamedTuple):
    """Space-group operators on fractional coordinates, x' = R x + t.

    Attributes:
        rot: (n_ops, 3, 3) rotation parts (float).
        trans: (n_ops, 3) translations (fractional).
    """

    rot: np.ndarray
    trans: np.ndarray


def symops_of(crystal) -> SymOps:
    """All operators (centring included) of a :class:`jaxrefine.crystal.Crystal`."""
    return SymOps(rot=np.asarray(crystal.rot, float), trans=np.asarray(crystal.trans, float))


def _direct_chunk(xyz_frac, b_iso, occ, hkl, s2, symops: SymOps, ff: FormFactors):
    """F for one chunk of reflections: (n_chunk,) complex."""
    f_types = f0(ff, s2)  # (r, t)
    f_atoms = f_types[:, ff.type_index]  # (r, n)
    f_atoms = f_atoms * occ[None, :] * jnp.exp(-b_iso[None, :] * s2[:, None] / 4.0)
    # h·(R x + t) = (R^T h)·x + h·t
    h = hkl.astype(xyz_frac.dtype)
    h_rot = jnp.einsum("ri,oij->orj", h, symops.rot)  # (ops, r, 3) = h R
    phase_t = jnp.einsum("ri,oi->or", h, symops.trans)  # (ops, r)
    arg = TWO_PI * (jnp.einsum("orj,nj->orn", h_rot, xyz_frac) + phase_t[:, :, None])
    geom_re = jnp.cos(arg).sum(0)  # (r, n)
    geom_im = jnp.sin(arg).sum(0)
    return (f_atoms * geom_re).sum(1) + 1j * (f_atoms * geom_im).sum(1)


def f_calc_direct(xyz_frac, b_iso, occ, hkl, s2, symops: SymOps, ff: FormFactors, chunk: int = 256):
    """Exact structure factors by direct summation, chunked over reflections.

    Args:
        xyz_frac: (n_atoms, 3) fractional coordinates.
        b_iso: (n_atoms,) isotropic B (Å²).
        occ: (n_atoms,) occupancies.
        hkl: (n_refl, 3) int Miller indices.
        s2: (n_refl,) 1/d² (Å⁻²).
        symops: space-group operators.
        ff: form factors (type_index of length n_atoms).
        chunk: reflections per chunk (memory ~ chunk · n_atoms · n_ops).

    Returns:
        (n_refl,) complex F_calc (electrons).
    """
    n = hkl.shape[0]
    n_pad = (-n) % chunk
    hkl_p = jnp.concatenate([jnp.asarray(hkl), jnp.zeros((n_pad, 3), dtype=jnp.asarray(hkl).dtype)])
    s2_p = jnp.concatenate([jnp.asarray(s2), jnp.zeros((n_pad,), dtype=jnp.asarray(s2).dtype)])
    hkl_c = hkl_p.reshape(-1, chunk, 3)
    s2_c = s2_p.reshape(-1, chunk)
    out = jax.lax.map(lambda a: _direct_chunk(xyz_frac, b_iso, occ, a[0], a[1], symops, ff), (hkl_c, s2_c))
    return out.reshape(-1)[:n]
