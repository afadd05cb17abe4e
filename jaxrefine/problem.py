"""The refinement problem: everything that stays fixed during one minimisation.

``Problem`` is a pytree of arrays (passed to jitted functions as an argument, never closed
over).  Fields that change between macrocycles — the solvent mask's F_mask, the scales, σA,
the non-bonded list and the weights — are replaced with ``problem._replace(...)`` outside jit,
keeping their shapes so that the energy compiles once per problem.

``Setup`` carries what the macrocycle loop needs besides the arrays: the model read, the data,
the configuration and the builders for masks and neighbour lists (Python objects, not traced).
"""
from __future__ import annotations

import logging
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .config import Config
from .errors import InputError
from .io.model import Model, read_model
from .io.reflections import Reflections, check_compatible, read_reflections
from .params import AtomMaps, Params, b_to_raw, occ_to_raw

log = logging.getLogger(__name__)



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
    scales: Any  # xray.fmodel.Scales
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


def rigid_bodies(model: Model, spec: str):
    """(n,) body index and (n_bodies, 3) centres for the spec "chain", "all" or "sel1; sel2".

    Atoms outside every selection form one extra body that never moves in rigid refinement
    only if it is listed; here they join the nearest listed body's index 0 (kept simple: chain
    bodies cover every atom).
    """
    if spec == "all":
        idx = np.zeros(model.n_atoms, np.int32)
    elif spec == "chain":
        _, idx = np.unique(model.chain_id, return_inverse=True)
    else:
        idx = np.full(model.n_atoms, -1, np.int32)
        for k, sel in enumerate(s for s in spec.split(";") if s.strip()):
            idx[model.select(sel) & (idx < 0)] = k
        if (idx < 0).any():
            idx[idx < 0] = idx.max() + 1
    idx = idx.astype(np.int32)
    n_b = int(idx.max()) + 1
    centres = np.stack([model.xyz_cart[idx == b].mean(0) for b in range(n_b)])
    return idx, centres


def initial_params(model: Model, maps: AtomMaps, group_start, group_set, set_total, set_size, dtype) -> Params:
    n_b = maps.body_centre.shape[0]
    return Params(
        xyz_frac=jnp.asarray(model.xyz_frac, dtype),
        b_raw=jnp.asarray(b_to_raw(model.b_iso, float(maps.b_min)), dtype),
        occ_raw=jnp.asarray(occ_to_raw(group_start, group_set, set_total, set_size), dtype),
        rot=jnp.zeros((n_b, 3), dtype),
        trans=jnp.zeros((n_b, 3), dtype),
    )


def load_inputs(model_path, data_path, cfg: Config):
    """Read and check model and data files as the configuration says."""
    from .io.writers import protect

    protect(model_path, data_path)
    model = read_model(model_path, hydrogens=(cfg.model.hydrogens == "keep"))
    d = cfg.data
    refl = read_reflections(
        data_path, labin=d.labin, free_value=d.free_value, free_fraction=d.free_fraction,
        free_seed=d.free_seed, d_min=d.d_min, d_max=d.d_max,
    )
    check_compatible(model.crystal, refl.crystal, os.fspath(model_path), os.fspath(data_path))
    m = cfg.model
    if m.place_rotation or m.place_translation or m.place_translation_frac:
        from .placement import place_model

        model = place_model(model, m.place_rotation or None, m.place_translation or None, m.place_translation_frac or None)
        log.info("%s: placed with rotation %s and translation %s", model_path, list(m.place_rotation),
                 list(m.place_translation or m.place_translation_frac))
    if refl.n_free == 0:
        raise InputError(f"{data_path}: the free set is empty; pass data.free_value or remove the flag column to generate one")
    return model, refl
