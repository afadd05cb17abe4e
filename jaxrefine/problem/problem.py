"""The refinement problem: everything that stays fixed during one minimisation.

``Problem`` is a pytree of arrays (passed to jitted functions as an argument, never closed
over).  Fields that change between macrocycles — the solvent mask's F_mask, the scales, σA,
the non-bonded list and the weights — are replaced with ``problem._replace(...)`` outside jit,
keeping their shapes so that the energy compiles once per problem.

``Setup`` carries what the macrocycle loop needs besides the arrays: the model read, the data,
the configuration and the builders for masks and neighbour lists (Python objects, not traced).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax

from ..config import Config
from ..io.model import Model
from ..io.reflections import Reflections
from .params import AtomMaps, Params


class XrayData(NamedTuple):
    """Observed data and the per-macrocycle X-ray model state (arrays, (n_refl,) unless noted)."""

    hkl: jax.Array  # (n, 3) int
    s2: jax.Array  # 1/d² (Å⁻²)
    s_cart: jax.Array  # (n, 3) Cartesian reciprocal vectors (Å⁻¹)
    sigma_a_use: jax.Array  # bool, reflections σA is estimated from (free set, or work if too few)
    f_obs: jax.Array
    sig_f_obs: jax.Array
    work: jax.Array  # bool, reflections used in the target
    free: jax.Array  # bool
    centric: jax.Array  # bool
    epsilon: jax.Array  # float
    bins: jax.Array  # int resolution bin of σA
    f_mask: jax.Array  # complex, F of the bulk-solvent mask (refreshed per macrocycle)
    scales: Any  # xray.scaling.Scales
    sigma_a: Any  # xray.targets.SigmaA


class Problem(NamedTuple):
    """The static refinement problem (a pytree).

    Attributes:
        maps: how Params become per-atom coordinates, B and occupancy.
        sf: structure-factor setup (hkl, form factors, symmetry, FFT grid).
        xray: observed data and the current solvent/scale/σA state.
        restraints: geometry restraints (padded index arrays).
        nonbonded: non-bonded pair list (padded; rebuilt per macrocycle).
        geo_weights: per-term geometry weights.
        w_a: weight of E_geometry (scalar array).
        w_b: weight of the ADP restraints (scalar array).
        u_shape: (n, 6) fixed anisotropic part of U (Cartesian Å², trace-free: ANISOU minus its
            isotropic equivalent) added to the refined isotropic B in F_calc; None when the model
            has no ANISOU (or refine.keep_anisou is false).
    """

    maps: AtomMaps
    sf: Any
    xray: XrayData
    restraints: Any
    nonbonded: Any
    geo_weights: Any
    w_a: jax.Array
    w_b: jax.Array
    u_shape: Any = None


class Setup(NamedTuple):
    """A problem, its starting parameters and the context the macrocycle loop needs."""

    problem: Problem
    params: Params
    model: Model
    refl: Reflections
    config: Config
    monlib: str | None
