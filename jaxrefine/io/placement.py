"""Molecular-replacement placement: put a search model in the cell with a rotation and a translation.

x' = R · x + t (Cartesian Å, rotation about the origin of the model's coordinate frame), the usual
convention for applying an MR solution's operator to a search model.  R is a 3×3 matrix or built
from Euler angles in the ZYZ convention (α about z, then β about the new y, then γ about the new z;
Rossmann & Blow 1962; the convention of the CCP4 programs).  The translation may be given in
fractional coordinates of the target cell.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .build import with_coordinates


def euler_zyz(alpha: float, beta: float, gamma: float) -> np.ndarray:
    """3×3 rotation matrix R = Rz(α) · Ry(β) · Rz(γ), angles in degrees."""
    a, b, g = np.radians([alpha, beta, gamma])

    def rz(t):
        return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])

    def ry(t):
        return np.array([[np.cos(t), 0.0, np.sin(t)], [0.0, 1.0, 0.0], [-np.sin(t), 0.0, np.cos(t)]])

    return rz(a) @ ry(b) @ rz(g)


def rotation_from(spec) -> np.ndarray:
    """A rotation matrix from 3 ZYZ Euler angles (degrees) or 9 matrix elements (row-major)."""
    v = np.asarray(spec, float).ravel()
    if v.size == 3:
        return euler_zyz(*v)
    if v.size == 9:
        r = v.reshape(3, 3)
        if not np.allclose(r @ r.T, np.eye(3), atol=1e-4) or np.linalg.det(r) < 0:
            raise ConfigError(f"placement rotation {v.tolist()} is not a proper rotation matrix")
        return r
    raise ConfigError(f"placement rotation needs 3 Euler angles or 9 matrix elements, got {v.size} numbers")


def place_model(model, rotation=None, translation=None, translation_frac=None):
    """The model moved by x' = R x + t (see module docstring).

    Args:
        model: :class:`jaxrefine.io.model.Model` (its cell is the target cell).
        rotation: 3 Euler angles (deg, ZYZ) or a 3×3 matrix; None = identity.
        translation: (3,) Cartesian Å; or ``translation_frac``: (3,) fractional.
    """
    r = np.eye(3) if rotation is None else rotation_from(rotation)
    t = np.zeros(3)
    if translation is not None:
        t = np.asarray(translation, float).reshape(3)
    if translation_frac is not None:
        t = t + model.crystal.orth @ np.asarray(translation_frac, float).reshape(3)
    return with_coordinates(model, xyz_cart=model.xyz_cart @ r.T + t)
