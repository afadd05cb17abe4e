"""Perturbations of a model for tests, benchmarks and the demo (numpy; outside any gradient)."""
from __future__ import annotations

import numpy as np

from .build import with_coordinates
from .model import Model


def shake(model: Model, rms: float = 0.5, seed: int = 7, reset_b: bool = True) -> Model:
    """The shared data README's "shaken" start: hydrogens removed beforehand by the caller, every
    atom moved by a seeded Gaussian shift ``default_rng(seed).normal(0, rms/sqrt(3), 3)`` per atom in
    file order (rms Å overall), every B set to the model's mean B and ANISOU dropped.
    """
    rng = np.random.default_rng(seed)
    shifts = np.array([rng.normal(0.0, rms / np.sqrt(3), 3) for _ in range(model.n_atoms)])
    b = np.full(model.n_atoms, float(model.b_iso.mean())) if reset_b else model.b_iso
    return with_coordinates(model, xyz_cart=model.xyz_cart + shifts, b_iso=b)


def rigid_move(model: Model, angle_deg: float, shift: float, seed: int = 0, axis=None, direction=None) -> Model:
    """Rotate the whole model by ``angle_deg`` about its centre (random or given axis) and translate by
    ``shift`` Å (random or given direction): a molecular-replacement-like misplacement."""
    rng = np.random.default_rng(seed)
    axis = np.asarray(axis if axis is not None else rng.normal(size=3), float)
    axis /= np.linalg.norm(axis)
    direction = np.asarray(direction if direction is not None else rng.normal(size=3), float)
    direction /= np.linalg.norm(direction)
    th = np.radians(angle_deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(th) * k + (1 - np.cos(th)) * (k @ k)
    c = model.xyz_cart.mean(0)
    xyz = (model.xyz_cart - c) @ rot.T + c + shift * direction
    return with_coordinates(model, xyz_cart=xyz)
