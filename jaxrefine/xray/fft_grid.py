"""Spreading Gaussian atoms onto a periodic grid (the real-space half of FFT structure factors).

Each atom copy contributes a sum of normalised 3D Gaussians (its form factor's Gaussians, each
blurred by the atom's displacement), cut to a box of static size around it:

    g(d) = Σ_k w_k (2π)^{-3/2} det(M_k)^{1/2} exp(−½ dᵀ M_k d),

with d the offset of a grid point from the atom in grid steps and M_k the inverse covariance in
grid steps (Ten Eyck 1977, Acta Cryst. A33, 486; Afonine & Urzhumtsev 2004, Acta Cryst. A60, 19
for the choice of box and blur).  Boxes are added into a grid padded by the box size with one
windowed scatter (one index per atom, a contiguous (bx, by, bz) update), and the padding is then
folded back onto the periodic cell (see add_boxes).  The transpose of the scatter, used by reverse-mode autodiff,
is a windowed gather: the gradient of a target wrt the atom parameters is the map of ∂T/∂ρ read
back at the atoms (Agarwal 1978, Acta Cryst. A34, 791).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax



def box_offsets(p, n_box: int):
    """First grid index of a box of n_box points around grid coordinate p, and the offsets.

    The box starts at floor(p − n_box/2 + 1), so that the nearest point left out on either side
    is at least n_box/2 steps away, for even and odd n_box alike.

    Args:
        p: (m,) grid coordinates (grid steps, any real number).
        n_box: points in the box.

    Returns:
        (m,) int32 first index (unwrapped) and (m, n_box) offsets (index − p, grid steps).
    """
    start = jnp.floor(p - (0.5 * n_box - 1.0)).astype(jnp.int32)
    idx = start[:, None] + jnp.arange(n_box, dtype=jnp.int32)[None, :]
    return start, idx.astype(p.dtype) - p[:, None]


def box_rows(box: tuple, cov_xy, radius2: float):
    """The (x, y) rows of a box that can hold a point of the Gaussian above the cut.

    A box point is needed when dᵀ Σ⁻¹ d <= r² for some atom position in the box's central cell;
    its (x, y) row is needed when the marginal (x, y) ellipse d_xyᵀ Σ_xy⁻¹ d_xy <= r² meets the
    row's unit square of offsets (cutting the corners of the box saves ~20 % of the points).

    Args:
        box: (bx, by, bz).
        cov_xy: (2, 2) covariance of the widest Gaussian of the class along grid axes a, b
            (grid steps²).
        radius2: r², the squared Mahalanobis radius of the cut.

    Returns:
        tuple of (ox, oy) offsets into the box, in x-major order.
    """
    inv = np.linalg.inv(np.asarray(cov_xy, float))
    t = np.linspace(0.0, 1.0, 9)
    rows = []
    for ox in range(box[0]):
        for oy in range(box[1]):
            # offsets d of this row lie in (o − n/2, o − n/2 + 1] (see box_offsets)
            dx = ox - 0.5 * box[0] + t
            dy = oy - 0.5 * box[1] + t
            q = inv[0, 0] * dx[:, None] ** 2 + 2 * inv[0, 1] * dx[:, None] * dy[None] + inv[1, 1] * dy[None] ** 2
            if q.min() <= radius2 * 1.05:
                rows.append((ox, oy))
    return tuple(rows)


def gaussian_boxes(p, metric, weight, box: tuple, rows: tuple, z_coupled: bool):
    """Values of sums of weighted Gaussians on the rows of their boxes.

    Each centre carries K Gaussians (one atom's form factor as a sum of Gaussians, all blurred by
    the atom's B), g(d) = Σ_k w_k exp(−½ dᵀ M_k d).  The exponent is split: the (x, y) part is
    evaluated once per row and the z part once per z offset, so that without a z coupling
    (M_xz = M_yz = 0: orthogonal, hexagonal and isotropic atoms) the sum over k is one small
    matrix product per centre, (rows, K) @ (K, bz); otherwise one exponential per point and k.

    Args:
        p: (m, 3) grid coordinates of the centres.
        metric: (m, K, 3, 3) inverse covariances M_k in grid steps.
        weight: (m, K) prefactor of each Gaussian (its value at the centre).
        box: (bx, by, bz) static box size.
        rows: static (ox, oy) rows of the box to evaluate (see box_rows).
        z_coupled: static, M_xz or M_yz may be non-zero.

    Returns:
        (m, 3) int32 first box index (unwrapped), (m, n_rows, bz) values.
    """
    starts, offs = zip(*(box_offsets(p[:, a], box[a]) for a in range(3)))
    start = jnp.stack(starts, axis=1)
    ox = np.array([r[0] for r in rows])
    oy = np.array([r[1] for r in rows])
    dx, dy, dz = offs[0][:, None, ox], offs[1][:, None, oy], offs[2][:, None, :]  # (m, 1, r), (m, 1, r), (m, 1, bz)
    m = lambda a, b: metric[:, :, a, b][:, :, None]  # noqa: E731  (m, K, 1)
    q_xy = 0.5 * m(0, 0) * dx * dx + 0.5 * m(1, 1) * dy * dy + m(0, 1) * dx * dy  # (m, K, r)
    q_z = 0.5 * m(2, 2) * dz * dz  # (m, K, bz)
    if not z_coupled:
        vals = jnp.einsum("mkr,mkz->mrz", jnp.exp(-q_xy) * weight[:, :, None], jnp.exp(-q_z))
    else:
        lin = (m(0, 2) * dx + m(1, 2) * dy)[..., None] * dz[:, :, None, :]
        vals = jnp.einsum("mkrz,mk->mrz", jnp.exp(-(q_xy[..., None] + q_z[:, :, None, :] + lin)), weight)
    return start, vals


def add_boxes(padded, grid_shape: tuple, start, vals, rows: tuple):
    """Add box rows into a grid padded along c (one scatter of z-rows; measured faster on CPU
    than a scatter of single points or of whole 3D windows folded along three axes).

    Every (atom, x, y) row of a box is added as one contiguous window along c into a grid padded
    by at least the box length along c; :func:`fold_periodic_c` folds the padding back once all
    boxes are in (periodicity along a and b is taken by the indices).

    Args:
        padded: (na, nb, nc + pad) grid, pad >= bz.
        grid_shape: (na, nb, nc).
        start: (m, 3) int first index of each box (any integer; wrapped here).
        vals: (m, n_rows, bz) values.
        rows: static (ox, oy) of each row.

    Returns:
        the padded grid with the boxes added.
    """
    dims = lax.ScatterDimensionNumbers(
        update_window_dims=(2,), inserted_window_dims=(0, 1), scatter_dims_to_operand_dims=(0, 1, 2)
    )
    index = _row_index(start, grid_shape, rows)
    return lax.scatter_add(padded, index, vals, dims, mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _row_index(start, grid_shape: tuple, rows: tuple):
    """(m, n_rows, 3) grid index of the first point of each box row (wrapped along a and b)."""
    na, nb, nc = grid_shape
    m, n_rows = start.shape[0], len(rows)
    ox = jnp.asarray(np.array([r[0] for r in rows]), start.dtype)
    oy = jnp.asarray(np.array([r[1] for r in rows]), start.dtype)
    return jnp.stack(
        [
            (start[:, 0, None] + ox[None]) % na,
            (start[:, 1, None] + oy[None]) % nb,
            jnp.broadcast_to((start[:, 2] % nc)[:, None], (m, n_rows)),
        ],
        axis=-1,
    )


def _read_rows(grid, index, bz: int):
    """The transpose of add_boxes: (m, n_rows, bz) values of a padded grid on the box rows."""
    dims = lax.GatherDimensionNumbers(offset_dims=(2,), collapsed_slice_dims=(0, 1), start_index_map=(0, 1, 2))
    return lax.gather(grid, index, dims, slice_sizes=(1, 1, bz), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


# ------------------------------------------------------------------- spreading with its own VJP
# Reverse-mode autodiff of gaussian_boxes + add_boxes keeps and differentiates every (atom, k, row,
# z) intermediate: the backward pass took 5-7x the forward (1va7).  The rule below recomputes the
# Gaussians once and reduces them to ten moments per atom and k, Σ G·E·dᵃ (|a| <= 2), from which
# the derivatives wrt the weights, the metric and the centres follow in closed form:
#   q = ½ dᵀ M d, d = index − p:  ∂vals/∂w_k = E_k,  ∂vals/∂M_ab = −w_k E_k d_a d_b (×½ on the
#   diagonal, as the forward reads each off-diagonal entry once),  ∂vals/∂p = Σ_k w_k E_k M_k d.
@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def spread_boxes(padded, p, metric, weight, grid_shape: tuple, box: tuple, rows: tuple, z_coupled: bool):
    """``padded`` plus the Gaussians of :func:`gaussian_boxes` added with :func:`add_boxes` (same
    arguments); differentiable wrt ``padded``, ``p``, ``metric`` and ``weight`` by a hand-written rule."""
    start, vals = gaussian_boxes(p, metric, weight, box, rows, z_coupled)
    return add_boxes(padded, grid_shape, start, vals, rows)


def _spread_fwd(padded, p, metric, weight, grid_shape, box, rows, z_coupled):
    return spread_boxes(padded, p, metric, weight, grid_shape, box, rows, z_coupled), (p, metric, weight)


def _spread_bwd(grid_shape, box, rows, z_coupled, res, g):
    p, metric, weight = res
    starts, offs = zip(*(box_offsets(p[:, a], box[a]) for a in range(3)))
    start = jnp.stack(starts, axis=1)
    gw = _read_rows(g, _row_index(start, grid_shape, rows), box[2])  # (m, r, bz)
    ox = np.array([r[0] for r in rows])
    oy = np.array([r[1] for r in rows])
    dx, dy, dz = offs[0][:, ox], offs[1][:, oy], offs[2]  # (m, r), (m, r), (m, bz)
    mm = lambda a, b: metric[:, :, a, b]  # noqa: E731  (m, K)
    q_xy = 0.5 * mm(0, 0)[..., None] * dx[:, None] ** 2 + 0.5 * mm(1, 1)[..., None] * dy[:, None] ** 2 \
        + mm(0, 1)[..., None] * (dx * dy)[:, None]  # (m, K, r)
    q_z = 0.5 * mm(2, 2)[..., None] * dz[:, None] ** 2  # (m, K, bz)
    z_basis = jnp.stack([jnp.ones_like(dz), dz, dz * dz], axis=-1)  # (m, bz, 3)
    r_basis = jnp.stack([jnp.ones_like(dx), dx, dy, dx * dx, dy * dy, dx * dy], axis=-1)  # (m, r, 6)
    if not z_coupled:
        h = jnp.einsum("mrz,mkzj->mkrj", gw, jnp.exp(-q_z)[..., None] * z_basis[:, None])
        mom = jnp.einsum("mkrj,mri->mkij", h * jnp.exp(-q_xy)[..., None], r_basis)  # (m, K, 6, 3)
    else:
        lin = (mm(0, 2)[..., None] * dx[:, None] + mm(1, 2)[..., None] * dy[:, None])[..., None] * dz[:, None, None, :]
        e = jnp.exp(-(q_xy[..., None] + q_z[:, :, None, :] + lin)) * gw[:, None]  # (m, K, r, bz)
        mom = jnp.einsum("mkrj,mri->mkij", jnp.einsum("mkrz,mzj->mkrj", e, z_basis), r_basis)
    s0 = mom[..., 0, 0]
    s1 = jnp.stack([mom[..., 1, 0], mom[..., 2, 0], mom[..., 0, 1]], axis=-1)  # Σ G E d_a  (m, K, 3)
    w = weight
    zero = jnp.zeros_like(s0)
    cross_xz = -w * mom[..., 1, 1] if z_coupled else zero
    cross_yz = -w * mom[..., 2, 1] if z_coupled else zero
    d_metric = jnp.stack([
        jnp.stack([-0.5 * w * mom[..., 3, 0], -w * mom[..., 5, 0], cross_xz], -1),
        jnp.stack([zero, -0.5 * w * mom[..., 4, 0], cross_yz], -1),
        jnp.stack([zero, zero, -0.5 * w * mom[..., 0, 2]], -1),
    ], -2)
    # the symmetric metric as the forward reads it (upper entries; no z coupling unless z_coupled)
    m01, m02, m12 = mm(0, 1), (mm(0, 2) if z_coupled else zero), (mm(1, 2) if z_coupled else zero)
    sym = jnp.stack([jnp.stack([mm(0, 0), m01, m02], -1), jnp.stack([m01, mm(1, 1), m12], -1),
                     jnp.stack([m02, m12, mm(2, 2)], -1)], -2)
    d_p = jnp.einsum("mk,mkab,mkb->ma", w, sym, s1)
    return g, d_p.astype(p.dtype), d_metric.astype(metric.dtype), s0.astype(weight.dtype)


spread_boxes.defvjp(_spread_fwd, _spread_bwd)


def fold_periodic_c(padded, nc: int):
    """Fold a grid padded along its last axis back onto the period nc: (..., nc + p) -> (..., nc)."""
    out = padded[..., :nc]
    start = nc
    while start < padded.shape[-1]:  # boxes longer than the cell wrap more than once
        stop = min(start + nc, padded.shape[-1])
        out = out.at[..., : stop - start].add(padded[..., start:stop])
        start = stop
    return out
