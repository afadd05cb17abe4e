"""Map slices for notebooks: a unit-cell map sampled on a plane through some atoms (matplotlib axes).

The plane is the least-squares plane of the given atoms (its normal is the direction of least
variance, the smallest principal axis; Pearson 1901, Phil. Mag. 2, 559), so a side chain or a
short segment lies in it as well as a flat picture allows.  Drawing functions take a matplotlib
``Axes`` and never choose a backend, so they work inline in Jupyter as well as in scripts.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .density import sample_map


class MapPlane(NamedTuple):
    """A square plane of map values.

    Attributes:
        values: (n, n) map values; [i, j] at origin + u_i·u + v_j·v with u_i, v_j in ±half_width.
        origin: (3,) Cartesian centre (Å); u, v: (3,) orthonormal in-plane axes.
        half_width: Å.
        sigma: RMS of the whole map (to contour in σ units).
    """

    values: np.ndarray
    origin: np.ndarray
    u: np.ndarray
    v: np.ndarray
    half_width: float
    sigma: float

    def project(self, xyz_cart):
        """(k, 2) in-plane coordinates (Å) and (k,) distance from the plane (Å) of Cartesian points."""
        d = np.asarray(xyz_cart, float).reshape(-1, 3) - self.origin
        normal = np.cross(self.u, self.v)
        return np.stack([d @ self.u, d @ self.v], 1), d @ normal


def map_plane(values, crystal, through_xyz, half_width: float = 8.0, spacing: float = 0.25) -> MapPlane:
    """Sample a unit-cell map on the best plane through some atoms.

    Args:
        values: (na, nb, nc) unit-cell map (see :func:`jaxrefine.validate.density.sample_map`).
        crystal: :class:`jaxrefine.core.crystal.Crystal` of the map.
        through_xyz: (k ≥ 3, 3) Cartesian atoms (Å) that define the plane and its centre.
        half_width: Å from the centre to the edge of the square.
        spacing: Å between sampled points.

    Returns:
        :class:`MapPlane`.
    """
    pts = np.asarray(through_xyz, float).reshape(-1, 3)
    origin = pts.mean(0)
    _, _, vt = np.linalg.svd(pts - origin)
    u, v = vt[0], vt[1]
    t = np.arange(-half_width, half_width + 1e-9, spacing)
    grid = origin + t[:, None, None] * u + t[None, :, None] * v  # (n, n, 3)
    vals = sample_map(values, crystal.to_frac(grid.reshape(-1, 3))).reshape(len(t), len(t))
    return MapPlane(vals, origin, u, v, float(half_width), float(np.std(values)))


def draw_map_plane(ax, plane: MapPlane, levels_sigma=(1.0, 2.0, 3.0), negative: bool = False, title: str = "",
                   cmap: str = "Blues"):
    """Filled contours of a :class:`MapPlane` in σ units (negative contours in red when asked)."""
    h = plane.half_width
    z = plane.values.T / plane.sigma  # rows = v, columns = u
    extent = (-h, h, -h, h)
    ax.contourf(z, levels=list(levels_sigma) + [max(float(z.max()), levels_sigma[-1]) + 1e-6], cmap=cmap,
                extent=extent, origin="lower", alpha=0.8)
    if negative:
        neg = [-lv for lv in reversed(levels_sigma)]
        ax.contour(z, levels=neg, colors="tab:red", extent=extent, origin="lower", linewidths=0.8)
    ax.set_xlim(-h, h)
    ax.set_ylim(-h, h)
    ax.set_aspect("equal")
    ax.set_xlabel("Å in plane")
    ax.set_ylabel("Å in plane")
    if title:
        ax.set_title(title)


def draw_atoms(ax, plane: MapPlane, xyz_cart, max_distance: float = 2.0, **style):
    """Atoms within ``max_distance`` Å of the plane as markers at their projected positions."""
    uv, dist = plane.project(xyz_cart)
    near = np.abs(dist) <= max_distance
    style = {"s": 18, "marker": "o", **style}
    return ax.scatter(uv[near, 0], uv[near, 1], **style)
