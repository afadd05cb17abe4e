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
    # offsets d of row o lie in (o − n/2, o − n/2 + 1] (see box_offsets): 9 samples along each axis
    dx = (np.arange(box[0])[:, None] - 0.5 * box[0] + t)[:, None, :, None]  # (bx, 1, 9, 1)
    dy = (np.arange(box[1])[:, None] - 0.5 * box[1] + t)[None, :, None, :]  # (1, by, 1, 9)
    q = inv[0, 0] * dx**2 + 2 * inv[0, 1] * dx * dy + inv[1, 1] * dy**2
    need = q.min(axis=(2, 3)) <= radius2 * 1.05
    return tuple((int(ox), int(oy)) for ox, oy in zip(*np.nonzero(need)))  # x-major


def gaussian_boxes(p, metric, weight, box: tuple, rows: tuple, z_coupled: bool):
    """Values of sums of weighted Gaussians on the rows of their boxes.

    Each centre carries K Gaussians (one atom's form factor as a sum of Gaussians, all blurred by
    the atom's B), g(d) = Σ_k w_k exp(−½ dᵀ M_k d).  The exponent is split: the (x, y) part is
    evaluated once per row and the z part once per z offset, so that without a z coupling
    (M_xz = M_yz = 0: orthogonal, hexagonal and isotropic atoms) each Gaussian is an outer product of
    its row and z factors; otherwise one exponential per point and k.

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
    # the sum over k unrolled (K is static and small): XLA fuses it into one pass over the box, where a
    # contraction over k ran as a batched product per atom (1va7's shapes, z-coupled: 2.8 vs 6.9 ms; 4iid's
    # 8870 atoms in 10³ boxes, isotropic: 18 vs 38 ms)
    if not z_coupled:
        e_xy, e_z = jnp.exp(-q_xy) * weight[:, :, None], jnp.exp(-q_z)
        vals = sum(e_xy[:, k, :, None] * e_z[:, k, None, :] for k in range(weight.shape[1]))
    else:
        lin = (m(0, 2) * dx + m(1, 2) * dy)[..., None] * dz[:, :, None, :]  # (m, K, r, bz)
        vals = sum(weight[:, k, None, None] * jnp.exp(-(q_xy[:, k, :, None] + q_z[:, k, None, :] + lin[:, k]))
                   for k in range(weight.shape[1]))
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
    """(m, n_rows, 3) grid index of the first point of each box row (wrapped along a and b).  (One flat index per
    row into the flattened grid instead took a third less memory but made 1l2h's evaluations ~20 % slower.)"""
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
    arguments); differentiable wrt ``padded``, ``p``, ``metric`` and ``weight`` by a hand-written rule.  Large
    classes are added in chunks of atoms (:func:`_n_chunks`), so that only one chunk's values exist at a time."""
    n_chunks = _n_chunks(p.shape[0], len(rows) * box[2], FORWARD_CHUNK_POINTS, FORWARD_CHUNK_ABOVE)
    if n_chunks <= 1:
        start, vals = gaussian_boxes(p, metric, weight, box, rows, z_coupled)
        return add_boxes(padded, grid_shape, start, vals, rows)
    size = -(-p.shape[0] // n_chunks)
    # the last chunk filled up with copies of the last atom at zero weight (they add zeros)
    p, metric = (_pad_edge(x, n_chunks * size) for x in (p, metric))
    weight = jnp.pad(weight, [(0, n_chunks * size - weight.shape[0])] + [(0, 0)] * (weight.ndim - 1))

    def add_chunk(i, grid):
        part = lambda x: lax.dynamic_slice_in_dim(x, i * size, size)  # noqa: E731
        start, vals = gaussian_boxes(part(p), part(metric), part(weight), box, rows, z_coupled)
        return add_boxes(grid, grid_shape, start, vals, rows)

    return lax.fori_loop(0, n_chunks, add_chunk, padded)


def _spread_fwd(padded, p, metric, weight, grid_shape, box, rows, z_coupled):
    return spread_boxes(padded, p, metric, weight, grid_shape, box, rows, z_coupled), (p, metric, weight)


def _centred(n: int):
    """Offsets of a box axis's points from the box centre (constants: the offsets from an atom are these
    plus a shift in (−½, ½] per atom)."""
    return np.arange(n) - 0.5 * (n - 1)


# On CPU the backward pass runs over chunks of atoms when a class's boxes hold more than CHUNK_ABOVE points in
# all, each chunk about CHUNK_POINTS points, so that one Gaussian's values over a chunk stay in cache for the
# product with the moment basis (1va7, 1395 atoms in 13×12×12 boxes: 34 -> 15 ms; 499 in 15³: 23 -> 10 ms;
# smaller classes gained nothing).  On an accelerator the whole class is one product.
CHUNK_ABOVE = 2**20
CHUNK_POINTS = 2**18
# The forward pass of classes above FORWARD_CHUNK_ABOVE points, for memory: one class's values are an (m, rows, bz)
# array (4iid's largest: 59 MB of its Gauss-Newton program's 202 MB of temporaries, 95 MB with chunks of 2**21 points;
# peak RSS of a warm 4iid run 754 -> 571-586 MB at the same time).  Smaller classes stay in one pass: 1l2h's largest
# (2.3 M points) in chunks of 2**20 made its minimisations ~15 % slower.
FORWARD_CHUNK_ABOVE = 2**22
FORWARD_CHUNK_POINTS = 2**21


def _n_chunks(m: int, points: int, chunk_points: int = CHUNK_POINTS, above: int = CHUNK_ABOVE) -> int:
    """Chunks of atoms for a class of ``m`` atoms with ``points`` box points each (see CHUNK_ABOVE)."""
    return -(-m * points // chunk_points) if m * points > above and jax.default_backend() == "cpu" else 1


def _pad_edge(x, n: int):
    """``x`` filled up to ``n`` rows with copies of its last row."""
    return jnp.pad(x, [(0, n - x.shape[0])] + [(0, 0)] * (x.ndim - 1), mode="edge")


def _spread_bwd(grid_shape, box, rows, z_coupled, res, g):
    p, metric, weight = res
    m = p.shape[0]
    n_chunks = _n_chunks(m, len(rows) * box[2])
    if n_chunks <= 1:
        d_p, d_metric, d_weight = _box_gradients(p, metric, weight, g, grid_shape, box, rows, z_coupled)
    else:
        size = -(-m // n_chunks)
        out = lax.map(lambda a: _box_gradients(*a, g, grid_shape, box, rows, z_coupled),
                      tuple(_pad_edge(x, n_chunks * size).reshape((n_chunks, size) + x.shape[1:]) for x in (p, metric, weight)))
        d_p, d_metric, d_weight = (x.reshape((n_chunks * size,) + x.shape[2:])[:m] for x in out)
    return g, d_p.astype(p.dtype), d_metric.astype(metric.dtype), d_weight.astype(weight.dtype)


def _box_gradients(p, metric, weight, g, grid_shape, box, rows, z_coupled):
    """The spreading's gradients wrt (p, metric, weight) of the atoms given, from the cotangent grid g."""
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
    # The ten moments are taken about the box centre (d = c + o: o the constant offset of a point from the
    # centre, c the atom's shift, |c| <= ½), so that for each of the K Gaussians they are one product of the
    # (m, box) values with a constant (box, 10) matrix of monomials of o; then shifted to d.  Per-Gaussian
    # products over the flattened box (unrolled over K) measured fastest on CPU: 1va7's shapes 25 -> ~7 ms.
    # Without a z coupling the Gaussians factorise and the z sums come first (:func:`_moments_separable`).
    o_x, o_y, o_z = _centred(box[0])[ox], _centred(box[1])[oy], _centred(box[2])
    if z_coupled:
        raw = _moments_coupled(gw, q_xy, q_z, mm, dx, dy, dz, o_x, o_y, o_z, box)
    else:
        raw = _moments_separable(gw, q_xy, q_z, o_x, o_y, o_z)
    cx, cy, cz = ((offs[a][:, 0] + 0.5 * (box[a] - 1))[:, None] for a in range(3))  # (m, 1): d − o of box index 0
    s0, s_x, s_y, s_z = raw[..., 0], raw[..., 1], raw[..., 2], raw[..., 3]
    s1 = jnp.stack([s_x + cx * s0, s_y + cy * s0, s_z + cz * s0], axis=-1)  # Σ G E d_a  (m, K, 3)
    s_xx = raw[..., 4] + 2 * cx * s_x + cx * cx * s0
    s_yy = raw[..., 5] + 2 * cy * s_y + cy * cy * s0
    s_zz = raw[..., 6] + 2 * cz * s_z + cz * cz * s0
    s_xy = raw[..., 7] + cx * s_y + cy * s_x + cx * cy * s0
    w = weight
    zero = jnp.zeros_like(s0)
    cross_xz = -w * (raw[..., 8] + cx * s_z + cz * s_x + cx * cz * s0) if z_coupled else zero
    cross_yz = -w * (raw[..., 9] + cy * s_z + cz * s_y + cy * cz * s0) if z_coupled else zero
    d_metric = jnp.stack([
        jnp.stack([-0.5 * w * s_xx, -w * s_xy, cross_xz], -1),
        jnp.stack([zero, -0.5 * w * s_yy, cross_yz], -1),
        jnp.stack([zero, zero, -0.5 * w * s_zz], -1),
    ], -2)
    # the symmetric metric as the forward reads it (upper entries; no z coupling unless z_coupled)
    m01, m02, m12 = mm(0, 1), (mm(0, 2) if z_coupled else zero), (mm(1, 2) if z_coupled else zero)
    sym = jnp.stack([jnp.stack([mm(0, 0), m01, m02], -1), jnp.stack([m01, mm(1, 1), m12], -1),
                     jnp.stack([m02, m12, mm(2, 2)], -1)], -2)
    d_p = jnp.einsum("mk,mkab,mkb->ma", w, sym, s1)
    return d_p, d_metric, s0


def _moments_coupled(gw, q_xy, q_z, mm, dx, dy, dz, o_x, o_y, o_z, box):
    """(m, K, 10) moments Σ g·E_k·oᵃ about the box centre (1 x y z xx yy zz xy xz yz) when M_xz or M_yz is
    non-zero: one exponential per point and Gaussian, then one product with a constant (box, 10) basis."""
    bx_, by_, bz_ = (np.broadcast_to(v, (len(o_x), box[2])).reshape(-1) for v in (o_x[:, None], o_y[:, None], o_z[None]))
    basis = jnp.asarray(np.stack([np.ones_like(bx_), bx_, by_, bz_, bx_ * bx_, by_ * by_, bz_ * bz_, bx_ * by_,
                                  bx_ * bz_, by_ * bz_], -1), gw.dtype)  # (r·bz, 10)
    lin = (mm(0, 2)[..., None] * dx[:, None] + mm(1, 2)[..., None] * dy[:, None])  # (m, K, r)
    mom = []
    for k in range(q_xy.shape[1]):
        ex = q_xy[:, k, :, None] + q_z[:, k, None, :] + lin[:, k, :, None] * dz[:, None, :]
        mom.append((jnp.exp(-ex) * gw).reshape(gw.shape[0], -1) @ basis)
    return jnp.stack(mom, axis=1)


def _moments_separable(gw, q_xy, q_z, o_x, o_y, o_z):
    """The moments of :func:`_moments_coupled` when each Gaussian factorises into a row part and a z part
    (M_xz = M_yz = 0), E_k = exp(−q_xy,k) · exp(−q_z,k): the z sums first, Σ_z g·exp(−q_z,k)·o_zʲ (j = 0, 1, 2:
    three products per point for each k, no exponential per point), then the row sums with exp(−q_xy,k)."""
    dtype = gw.dtype
    zpow = jnp.asarray(np.stack([np.ones_like(o_z), o_z, o_z * o_z], -1), dtype)  # (bz, 3)
    ez = jnp.exp(-q_z)[..., None] * zpow  # (m, K, bz, 3)
    t = jnp.einsum("mrz,mkzj->mkrj", gw, ez)  # (m, K, r, 3): Σ_z g exp(−q_z) o_zʲ per row
    u = jnp.exp(-q_xy)[..., None] * t  # (m, K, r, 3)
    xy = jnp.asarray(np.stack([np.ones_like(o_x), o_x, o_y, o_x * o_x, o_y * o_y, o_x * o_y], -1), dtype)  # (r, 6)
    m0 = jnp.einsum("mkr,rb->mkb", u[..., 0], xy)  # 1 x y xx yy xy
    m1 = jnp.einsum("mkr,rb->mkb", u[..., 1], xy[:, :3])  # z xz yz
    m2 = jnp.sum(u[..., 2], axis=-1)  # zz
    return jnp.stack([m0[..., 0], m0[..., 1], m0[..., 2], m1[..., 0], m0[..., 3], m0[..., 4], m2, m0[..., 5],
                      m1[..., 1], m1[..., 2]], axis=-1)


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
