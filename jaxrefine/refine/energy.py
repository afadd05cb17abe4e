"""The weighted total energy E_total = E_xray + w_A · E_geometry + w_B · E_ADP.

E_xray is the maximum-likelihood amplitude target (default) or σ-weighted least squares, summed
over the work reflections; E_geometry is Σ w_term ((x − ideal)/σ)² over the restraints
(REFMAC5 convention, Murshudov et al. 2011, Acta Cryst. D67, 355).  With σ's from the
dictionary, −log-likelihood of the geometry is E_geometry / 2, so w_A = 0.5 is the "Bayesian"
balance; the automatic weight moves w_A from there (see :mod:`jaxrefine.refine.weights`).

All functions here are pure and jit-able with the signature ``(params, problem, state, ...)``:
``problem`` is static for a refinement, ``state`` (mask, scales, σA, neighbours, w_A) changes
between macrocycles with fixed shapes; ``target`` is static (one compiled function each).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from ..config import TARGETS
from ..problem.adp_model import U_SHIFT_SCALE, adp_restraint_energy, ncs_restraint_energy
from ..problem.params import Params, atom_xyz
from ..problem.problem import Problem, XrayState
from ..problem.xray_state import f_model_of
from ..restraints import geometry_energy
from ..xray.targets import ls_amplitude_target, ml_amplitude_target



class EnergyTerms(NamedTuple):
    total: jax.Array
    xray: jax.Array
    geometry: jax.Array
    adp: jax.Array


def xray_energy(params: Params, problem: Problem, state: XrayState, target: str = "ml"):
    """E_xray for the parameters: ML (Read 1986) or LS amplitude target over work reflections."""
    x = problem.xray
    fm = f_model_of(params, problem, state)
    if target == "ml":
        return ml_amplitude_target(x.f_obs, x.sig_f_obs, fm, state.sigma_a, x.centric, x.epsilon, x.work)
    return ls_amplitude_target(x.f_obs, x.sig_f_obs, fm, x.work)


def geometry_term(params: Params, problem: Problem, state: XrayState):
    """E_geometry (unweighted by w_A) at the parameters' coordinates, with the state's neighbour list."""
    xyz_cart, _ = atom_xyz(params, problem.maps)
    return geometry_energy(xyz_cart, problem.restraints, state.nonbonded, problem.geo_weights, problem.maps.orth, problem.maps.frac)


def adp_term(params: Params, problem: Problem):
    """E_ADP (unweighted by w_B): B similarity of bonded atoms; with anisotropic U also rigid bond,
    U similarity and isotropy (see :func:`jaxrefine.problem.adp_model.adp_restraint_energy`)."""
    return adp_restraint_energy(params, problem)


def energy_terms(params: Params, problem: Problem, state: XrayState, target: str = "ml") -> EnergyTerms:
    e_x = xray_energy(params, problem, state, target)
    e_g = geometry_term(params, problem, state) + ncs_restraint_energy(params, problem)
    e_b = adp_term(params, problem)
    return EnergyTerms(e_x + state.w_a * e_g + problem.w_b * e_b, e_x, e_g, e_b)


def total_energy(params: Params, problem: Problem, state: XrayState, target: str = "ml"):
    """E_total (scalar) — the function to differentiate: ``jax.grad(total_energy)(params, problem, state)``."""
    return energy_terms(params, problem, state, target).total


# ------------------------------------------------------------------- parameter blocks
# The minimiser works on shifts in well-scaled variables: coordinates in Å (not fractions of a
# cell edge), B parameters, occupancy logits, rigid-body rotations as arcs (radius × angle, Å) and
# translations (Å).  A block mask (arrays of 0/1, traced) selects which shifts are free, so one
# compiled function serves every block: coordinates, B, occupancies, rigid bodies or any mix.
BLOCKS = ("xyz", "b", "occ", "rigid")


# numpy, not jax.numpy: host code calls these once per block, and each jax.numpy call outside jit compiles a
# one-operation program per process (inside a traced function the numpy arrays become constants)
def zero_shifts(params: Params) -> Params:
    """Shifts of every parameter, all zero (the minimiser's starting point)."""
    return jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), params)


def block_mask(params: Params, blocks, b_scale: float = 1.0) -> Params:
    """Arrays shaped like ``params`` that free the given blocks: 1 for a free parameter, 0 for a fixed one,
    and ``b_scale`` for the ADP parameters of the "b" block (a diagonal preconditioner: the minimiser's unit
    shift moves B by ``b_scale`` Å², for minimising B together with coordinates in Å)."""
    on = lambda a, flag, value=1.0: np.full(a.shape, value if flag else 0.0, a.dtype)  # noqa: E731
    return Params(
        xyz_frac=on(params.xyz_frac, "xyz" in blocks),
        b_raw=on(params.b_raw, "b" in blocks, b_scale),
        occ_raw=on(params.occ_raw, "occ" in blocks),
        rot=on(params.rot, "rigid" in blocks),
        trans=on(params.trans, "rigid" in blocks),
        u_raw=None if params.u_raw is None else on(params.u_raw, "b" in blocks, b_scale),
        tls_raw=None if params.tls_raw is None else on(params.tls_raw, "b" in blocks, b_scale),
    )


def apply_shifts(shifts: Params, mask: Params, params: Params, problem: Problem) -> Params:
    """Parameters after the (masked) shifts."""
    z = jax.tree_util.tree_map(lambda a, m: a * m, shifts, mask)
    return Params(
        xyz_frac=params.xyz_frac + z.xyz_frac @ problem.maps.frac.T,
        b_raw=params.b_raw + z.b_raw,
        occ_raw=params.occ_raw + z.occ_raw,
        rot=params.rot + z.rot / problem.maps.body_radius[:, None],
        trans=params.trans + z.trans,
        u_raw=None if params.u_raw is None else params.u_raw + z.u_raw * U_SHIFT_SCALE,
        tls_raw=None if params.tls_raw is None else params.tls_raw + z.tls_raw * problem.adp.tls_shift_scale,
    )


def _make_shift_energy(target: str):
    def fn(shifts, mask, params, problem, state):
        return total_energy(apply_shifts(shifts, mask, params, problem), problem, state, target)

    fn.__name__ = f"shift_energy_{target}"
    return fn


# module-level function objects: stable identities, so jit caches them across calls
SHIFT_ENERGY = {t: _make_shift_energy(t) for t in TARGETS}
