"""The refinement problem, split by how often each part changes.

- ``Problem``: everything that stays fixed during a refinement (a pytree of arrays: how Params
  become atoms, the structure-factor setup, the observed data, the restraints, fixed weights).
- ``XrayState``: what is refitted between macrocycles, outside jit — the bulk-solvent F_mask, the
  scales, σA, the non-bonded neighbour list and w_A.  Its shapes never change, so the energy
  ``total_energy(params, problem, state)`` compiles once per problem.
- ``Params``: what the optimiser moves (:mod:`jaxrefine.problem.params`).

``Setup`` bundles a problem with its starting parameters and state and the inputs it was built
from (the model, the data, the configuration); it is what :func:`jaxrefine.problem.build_setup`
returns and what the macrocycle loop starts from.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from ..config import Config
from ..core.restraint_terms import bucket_length, pad_edge_rows
from ..io.model import Model
from ..io.reflections import Reflections
from .params import AtomMaps, Params


class XrayData(NamedTuple):
    """Observed data and their static bookkeeping (arrays, (n_refl,) unless noted).

    ``n_refl`` is the data's reflection count padded to :func:`reflection_bucket` (datasets of similar size then
    share compiled programs: JAX's cache keys on shapes).  The pads follow the observed reflections and copy the
    last of them (finite values everywhere, so no NaN reaches a gradient through a mask); they are in neither the
    work, the free nor the σA set, so every sum over a set leaves them out.  Host code that reports per reflection
    takes the first :func:`n_observed` entries (:func:`observed`).
    """

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
    observed: jax.Array  # bool, False for the pads at the end


# Reflection counts are padded to sizes on a geometric grid of this many steps per doubling (at most ~9 % more
# reflections, so at most ~9 % more work in the parts of F_calc and the targets that go by reflection; the FFT,
# which dominates, does not change).
REFLECTION_STEPS_PER_OCTAVE = 8
REFLECTION_QUANTUM = 64


def reflection_bucket(n: int) -> int:
    """``n`` reflections rounded up to the padded count the problem's arrays have (see :class:`XrayData`)."""
    return bucket_length(n, REFLECTION_STEPS_PER_OCTAVE, REFLECTION_QUANTUM)


pad_reflections = pad_edge_rows  # (n, ...) -> (length, ...), the pads copies of the last row


def n_observed(x: XrayData) -> int:
    """The number of observed reflections in ``x`` (its arrays' leading entries; the rest are pads)."""
    return int(np.count_nonzero(np.asarray(x.observed)))


def observed(x: XrayData, *arrays):
    """The observed part (the first :func:`n_observed` entries along axis 0) of each (n_refl, ...) array, as numpy
    arrays: one array for one argument, else a tuple."""
    n = n_observed(x)
    out = tuple(np.asarray(a)[:n] for a in arrays)
    return out[0] if len(out) == 1 else out


def observed_sigma_a(x: XrayData, sigma_a):
    """``sigma_a`` (:class:`jaxrefine.xray.targets.SigmaA` of the problem's reflections) for the observed ones."""
    d, s, bins = observed(x, sigma_a.d, sigma_a.s, sigma_a.bins)
    return sigma_a._replace(d=d, s=s, bins=bins)


class XrayState(NamedTuple):
    """The per-macrocycle state (a pytree; refreshed outside jit with the same shapes).

    Attributes:
        f_mask: (n_refl,) complex F of the bulk-solvent mask.
        scales: :class:`jaxrefine.xray.scaling.Scales` fitted on the work set.
        sigma_a: :class:`jaxrefine.xray.targets.SigmaA` (D, S per reflection).
        nonbonded: :class:`jaxrefine.restraints.nonbonded.NonbondedList` (padded to a fixed capacity).
        w_a: weight of E_geometry (scalar array).
    """

    f_mask: jax.Array
    scales: Any
    sigma_a: Any
    nonbonded: Any
    w_a: jax.Array


class Problem(NamedTuple):
    """The static refinement problem (a pytree).

    Attributes:
        maps: how Params become per-atom coordinates, B and occupancy.
        sf: structure-factor setup (hkl, form factors, symmetry, FFT grid).
        xray: observed data.
        restraints: geometry restraints (padded index arrays).
        geo_weights: per-term geometry weights.
        w_b: weight of the ADP restraints (scalar array).
        u_shape: (n, 6) fixed anisotropic part of U (Cartesian Å², trace-free: ANISOU minus its
            isotropic equivalent) added to the refined isotropic B in F_calc; None when the model
            has no ANISOU (or refine.keep_anisou is false).
        adp: :class:`jaxrefine.problem.adp_model.AdpModel` for anisotropic or TLS refinement,
            None for isotropic B.
        ncs: :class:`jaxrefine.problem.adp_model.NcsModel` (local NCS restraints) or None.
        riding: :class:`jaxrefine.problem.riding.Riding` hydrogens that ride on the atoms and scatter
            in F_calc (``model.hydrogens: riding``); None without.
    """

    maps: AtomMaps
    sf: Any
    xray: XrayData
    restraints: Any
    geo_weights: Any
    w_b: jax.Array
    u_shape: Any = None
    adp: Any = None
    ncs: Any = None
    riding: Any = None


class Setup(NamedTuple):
    """A problem with its starting parameters and X-ray state, and the inputs it was built from.

    ``model`` (atom names, residues, the gemmi structure for the writers) and ``refl`` stay here,
    outside every jitted function; ``problem``, ``params`` and ``state`` are arrays only.
    """

    problem: Problem
    params: Params
    state: XrayState
    model: Model
    refl: Reflections
    config: Config
    monlib: str | None
    adp_choice: Any = None  # jaxrefine.problem.adp_model.AdpChoice: the ADP model chosen and why
    ncs_copies: tuple = ()  # jaxrefine.io.ncs.NcsCopies restrained to each other
    hydrogens: tuple = ("remove", "")  # (mode, reason): model.hydrogens as chosen for this setup (auto resolved)
    strategy: tuple = ("", "")  # (strategy, reason): refine.strategy as chosen for this setup (auto resolved)
    spare_waters: Any = None  # (n_atoms,) bool: water slots kept for water picking (occupancy 0 until filled), or None
