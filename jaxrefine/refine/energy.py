"""The weighted total energy E_total = E_xray + w_A · E_geometry + w_B · E_ADP.

E_xray is the maximum-likelihood amplitude target (default) or σ-weighted least squares, summed
over the work reflections; E_geometry is Σ w_term ((x − ideal)/σ)² over the restraints
(REFMAC5 convention, Murshudov et al. 2011, Acta Cryst. D67, 355).  With σ's from the
dictionary, −log-likelihood of the geometry is E_geometry / 2, so w_A = 0.5 is the "Bayesian"
balance; the automatic weight moves w_A from there (see :mod:`jaxrefine.refine.weights`).

All functions here are pure and jit-able; ``target`` is static (one compiled function each).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..params import Params, atom_b, atom_occ, atom_xyz
from ..problem import Problem
from ..restraints import adp_energy, geometry_energy
from ..xray.fmodel import f_model
from ..xray.structure_factors import structure_factors
from ..xray.targets import ls_amplitude_target, ml_amplitude_target

TARGETS = ("ml", "ls")


class EnergyTerms(NamedTuple):
    total: jax.Array
    xray: jax.Array
    geometry: jax.Array
    adp: jax.Array


def model_f(params: Params, problem: Problem):
    """F_model (n_refl,) complex for the current parameters."""
    _, xyz_frac = atom_xyz(params, problem.maps)
    f_calc = structure_factors(xyz_frac, atom_b(params, problem.maps), atom_occ(params, problem.maps), problem.sf)
    x = problem.xray
    return f_model(f_calc, x.f_mask, x.s2, x.hkl, x.scales)


def xray_energy(params: Params, problem: Problem, target: str = "ml"):
    """E_xray for the parameters: ML (Read 1986) or LS amplitude target over work reflections."""
    x = problem.xray
    fm = model_f(params, problem)
    if target == "ml":
        return ml_amplitude_target(x.f_obs, x.sig_f_obs, fm, x.sigma_a, x.centric, x.epsilon, x.work)
    return ls_amplitude_target(x.f_obs, x.sig_f_obs, fm, x.work)


def geometry_term(params: Params, problem: Problem):
    xyz_cart, _ = atom_xyz(params, problem.maps)
    return geometry_energy(xyz_cart, problem.restraints, problem.nonbonded, problem.geo_weights, problem.maps.orth, problem.maps.frac)


def adp_term(params: Params, problem: Problem):
    return adp_energy(atom_b(params, problem.maps), problem.restraints, 1.0)


def energy_terms(params: Params, problem: Problem, target: str = "ml") -> EnergyTerms:
    e_x = xray_energy(params, problem, target)
    e_g = geometry_term(params, problem)
    e_b = adp_term(params, problem)
    return EnergyTerms(e_x + problem.w_a * e_g + problem.w_b * e_b, e_x, e_g, e_b)


def total_energy(params: Params, problem: Problem, target: str = "ml"):
    """E_total (scalar) — the function to differentiate: ``jax.grad(total_energy)(params, problem)``."""
    return energy_terms(params, problem, target).total


# ------------------------------------------------------------------- parameter blocks
# Each block minimises over one kind of parameter with the others fixed, in well-scaled
# variables: coordinate shifts in Å (not fractions of a cell edge), B parameters, occupancy
# logits, rigid-body rotations scaled by the body radius (Å of arc) and translations (Å).
BLOCKS = ("xyz", "b", "occ", "rigid")


def _apply_block(block: str, x, params: Params, problem: Problem, scale) -> Params:
    if block == "xyz":
        return params._replace(xyz_frac=params.xyz_frac + x @ problem.maps.frac.T)
    if block == "b":
        return params._replace(b_raw=x)
    if block == "occ":
        return params._replace(occ_raw=x)
    if block == "rigid":
        rot, trans = x
        return params._replace(rot=params.rot + rot / scale[:, None], trans=params.trans + trans)
    raise ValueError(block)


def block_start(block: str, params: Params):
    """The block variable at the current parameters (its starting point)."""
    if block == "xyz":
        return jnp.zeros_like(params.xyz_frac)
    if block == "b":
        return params.b_raw
    if block == "occ":
        return params.occ_raw
    return (jnp.zeros_like(params.rot), jnp.zeros_like(params.trans))


def _make_block_energy(block: str, target: str):
    if block in ("b", "occ"):  # geometry does not depend on B/occupancy: skip it
        def fn(x, params, problem, scale):
            p = _apply_block(block, x, params, problem, scale)
            e = xray_energy(p, problem, target)
            return e + problem.w_b * adp_term(p, problem) if block == "b" else e
    else:
        def fn(x, params, problem, scale):
            p = _apply_block(block, x, params, problem, scale)
            return xray_energy(p, problem, target) + problem.w_a * geometry_term(p, problem)
    fn.__name__ = f"energy_{block}_{target}"
    return fn


# module-level function objects: stable identities, so jit caches them across calls
BLOCK_ENERGY = {(b, t): _make_block_energy(b, t) for b in BLOCKS for t in TARGETS}


def apply_block(block: str, x, params: Params, problem: Problem, scale) -> Params:
    return _apply_block(block, x, params, problem, scale)
