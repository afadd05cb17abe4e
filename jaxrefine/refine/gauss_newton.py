"""Gauss–Newton steps for the coordinates (issue 15): fewer F_calc evaluations than L-BFGS for the same energy.

Each step solves (s·D_xray + w_A·2JᵀJ) Δ = −∇E_total for the Cartesian shifts Δ (Å) of every atom by
preconditioned conjugate gradients, then takes the longest of Δ, Δ/2, Δ/4, … that lowers E_total (Armijo), where

- **D_xray** is the per-atom diagonal of the Fisher information of the ML X-ray target in its complex-Gaussian limit
  (weight 2D²/(εS) per acentric work reflection, D²/(εS) centric, times k_total²), in closed form as a function of
  each atom's scattering type, B and occupancy: n_ops q² (4π²/3) Σ_h W f(s)² e^(−B s²/2) s², riding hydrogens added
  to their parent (the kind of diagonal servalcat tabulates; Murshudov et al. 1997 Acta Cryst. D53, 240 use the same
  Fisher approximation).  The sum runs over N_S2_BINS shells of s², so it costs atoms × shells, not atoms × reflections;
- **s** calibrates the closed form against the true Fisher information: their traces, the true one estimated along a
  random ±1 vector by central differences of F_model (Hutchinson's estimator; two F_calc evaluations per call).  The
  closed form alone came out at 0.70 (5kzb, 3.2 Å) to 0.92 (4iid, 2.3 Å) of the probed diagonal (benchmarks/gn_oracle.py);
- **2JᵀJ** is the Gauss–Newton matrix of E_geometry from its residual vector
  (:func:`jaxrefine.restraints.geometry.geometry_residuals`): positive semi-definite where the exact Hessian of a
  shaken model is not, and it carries the coupling of bonded atoms that a per-atom diagonal misses;
The other coordinate-dependent terms (NCS restraints, rigid-bond ADP restraints) enter through the gradient only: the
exact Hessian of the NCS term (Geman-McClure) is indefinite, and with it the steps on 1va7 stalled after two.  The
X-ray coupling between atoms is left out: the step is a quasi-Newton step, its X-ray part corrected from one step to
the next by the gradient.  Measured with the oracle (benchmarks/README.md run v): L-BFGS's 61-evaluation energy in 12-13
evaluations on 5kzb and 8 on 4iid.  Everything here runs inside one jit-compiled program per problem.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..problem.adp_model import adp_of, adp_restraint_energy
from ..problem.params import Params, atom_occ, atom_xyz
from ..problem.problem import Problem, XrayState
from ..problem.riding import scattering_atoms
from ..problem.xray_state import f_model_of
from ..restraints.geometry import geometry_residuals
from ..xray.adp import b_eq
from ..xray.formfactors import f0
from ..xray.scaling import k_total
from .energy import total_energy

N_S2_BINS = 64  # shells of s² for the closed-form X-ray diagonal
CALIBRATION_STEP = 0.01  # Å: central-difference step of the Fisher trace estimate
CALIBRATION_STEP_B = 0.05  # of the B parameter (≈ Å² where B is well above b_min)
DAMPING = 1e-3  # × the mean X-ray diagonal, added to it (Levenberg–Marquardt): atoms without X-ray curvature or
#                 restraints (a water given occupancy 0) stay put instead of flying off along a null direction
MAX_SHIFT = 1.0  # Å: the longest atom shift of one step (the step is scaled down to it)
MAX_B_SHIFT = 10.0  # Å²: the largest B shift of one step (likewise)
MAX_CG, CG_RTOL = 15, 0.1  # CG iterations per step and the relative residual they stop at (4iid: 30 and 0.05
#                            reached the same energy in more time, 8 a worse one)
ARMIJO_C1 = 1e-4
MAX_HALVINGS = 4  # trial steps 1, 1/2, 1/4, 1/8, 1/16 of the Gauss–Newton shift


class GaussNewtonStats(NamedTuple):
    """What one :func:`gauss_newton_steps` call did (0-d arrays).

    Attributes:
        steps: accepted Gauss–Newton steps.
        evaluations: E_total evaluations with gradient (the line search's trials and the start).
        cg_iterations: conjugate-gradient iterations, all steps.
        calibration: (2,) the calibrations s of the closed-form X-ray diagonals of the coordinates and of B (the ones
            given, or measured by this call).
        energy_start, energy_end: E_total before and after.
        grad_norm_start: ‖∂E_total/∂x‖ over the Cartesian coordinate shifts (Å) before the steps (with w_A = 0 and no
            steps: the X-ray gradient norm that the automatic w_A starts from, :func:`jaxrefine.refine.blocks.xray_gradient_norm`).
    """

    steps: jax.Array
    evaluations: jax.Array
    cg_iterations: jax.Array
    calibration: jax.Array
    energy_start: jax.Array
    energy_end: jax.Array
    grad_norm_start: jax.Array


def fisher_weights(problem: Problem, state: XrayState):
    """(n_refl,) weight of |∂F_model|² in the Fisher information of the ML target, complex-Gaussian limit:
    2D²/(εS) acentric, D²/(εS) centric, 0 outside the work set."""
    x = problem.xray
    w = jnp.where(x.centric, 1.0, 2.0) * state.sigma_a.d ** 2 / (x.epsilon * state.sigma_a.s)
    return jnp.where(x.work, w, 0.0)


def xray_curvature(params: Params, problem: Problem, state: XrayState, weights):
    """((n,), (n,)) closed-form diagonal of the X-ray Fisher information of each atom: per Cartesian direction (Å⁻²)
    and for its B (Å⁻⁴) (see the module docstring; the B part n_ops q² Σ_h W f² e^(−B s²/2) (s²/4)², a riding
    hydrogen's added to its parent's with the factor (B_H/B_P)²); ``weights`` from :func:`fisher_weights`."""
    x = problem.xray
    w = weights * k_total(state.scales, x.s_cart) ** 2
    s2 = x.s2
    shell = jnp.clip((s2 / jnp.max(s2) * N_S2_BINS).astype(jnp.int32), 0, N_S2_BINS - 1)
    ws2 = jax.ops.segment_sum(w * s2, shell, N_S2_BINS)
    ws4 = jax.ops.segment_sum(w * s2 * s2, shell, N_S2_BINS)
    s2_shell = ws4 / jnp.where(ws2 > 0, ws2, 1.0)
    xyz, _ = atom_xyz(params, problem.maps)
    b_sf, u_sf, u_total = adp_of(params, problem)
    b = b_sf if u_sf is None else b_eq(u_total)
    occ = atom_occ(params, problem.maps)
    n = xyz.shape[0]
    owner, db = jnp.arange(n), jnp.ones((n,), b.dtype)  # dB/dB_parent
    if problem.riding is not None:
        _, b, occ = scattering_atoms(xyz, b, occ, problem.riding, b)
        owner = jnp.concatenate([owner, problem.riding.parent])
        db = jnp.concatenate([db, jnp.broadcast_to(problem.riding.b_factor, problem.riding.parent.shape).astype(b.dtype)])
    f = f0(problem.sf.ff, s2_shell)[:, problem.sf.ff.type_index]  # (shells, scattering atoms)
    fe = f * f * jnp.exp(-0.5 * s2_shell[:, None] * b[None, :])
    q2 = problem.sf.rot.shape[0] * occ * occ  # n_ops q²
    c_xyz = q2 * (4.0 * jnp.pi**2 / 3.0) * jnp.einsum("s,sn->n", ws2, fe)
    c_b = q2 * db * db * jnp.einsum("s,sn->n", ws4 / 16.0, fe)  # Σ W s⁴/16 per shell (the s⁴ of the shell itself)
    return jax.ops.segment_sum(c_xyz, owner, n), jax.ops.segment_sum(c_b, owner, n)


def geometry_curvature_guess(problem: Problem, n: int, w_a):
    """(n,) rough diagonal of w_A × the Gauss–Newton matrix of E_geometry per Cartesian direction (for the
    preconditioner only): bonds, angles (|∇θ|² ≈ 1/(1.5 Å)²) and planes, 2 w/σ² × |∇r|² / 3 per restraint and atom."""
    r, wts = problem.restraints, problem.geo_weights
    dt = problem.maps.orth.dtype

    def members(idx, value):  # value per restraint (or per restraint atom) onto its atoms
        v = jnp.broadcast_to(value if value.ndim == idx.ndim else value[:, None], idx.shape)
        return jax.ops.segment_sum(v.reshape(-1).astype(dt), idx.reshape(-1), n)

    c = members(r.bond.idx, wts.bond * r.bond.mask / r.bond.sigma**2)
    c = c + members(r.angle.idx, 0.45 * wts.angle * r.angle.mask / r.angle.sigma**2)
    c = c + members(r.plane.idx, wts.plane * r.plane.atom_mask * (r.plane.mask / r.plane.sigma**2)[:, None])
    return w_a * (2.0 / 3.0) * c


def _pcg(apply_a, b, m_inv, max_iter, rtol):
    """Preconditioned conjugate gradients for A x = b from x = 0 (pytrees; ``m_inv`` the diagonal preconditioner,
    broadcast against b's leaves); stops at ``max_iter``, at ‖r‖ ≤ rtol ‖b‖, or on non-positive curvature
    (returning the iterate before it).  Returns (x, iterations)."""
    tm = jax.tree_util.tree_map
    precondition = lambda r: tm(lambda m, a: m * a, m_inv, r)  # noqa: E731
    b_norm = jnp.sqrt(_dot(b, b))
    z = precondition(b)

    def body(c):
        i, x, r, d, rz, _ = c
        ad = apply_a(d)
        dad = _dot(d, ad)
        bad = ~(dad > 0)
        a = rz / jnp.where(bad, 1.0, dad)
        x1, r1 = tm(lambda u, w: u + a * w, x, d), tm(lambda u, w: u - a * w, r, ad)
        z1 = precondition(r1)
        rz1 = _dot(r1, z1)
        beta = rz1 / jnp.where(rz > 0, rz, 1.0)
        d1 = tm(lambda u, w: u + beta * w, z1, d)
        done = bad | (jnp.sqrt(_dot(r1, r1)) <= rtol * b_norm)
        return (i + 1, tm(lambda u, w: jnp.where(bad, u, w), x, x1), r1, d1, rz1, done)

    init = (jnp.zeros((), jnp.int32), tm(jnp.zeros_like, b), b, z, _dot(b, z), b_norm == 0)
    i, x, _, _, _, _ = jax.lax.while_loop(lambda c: (c[0] < max_iter) & ~c[5], body, init)
    return x, i


def _fisher_quadratics(params: Params, problem: Problem, state: XrayState, weights, probes) -> list:
    """[(h v)ᵀ F (h v) for each probe shift h v] (F the Fisher information; J (h v) by central differences of F_model),
    and 0 for a missing second probe.  The F_model evaluations run one after another in one loop (one set of the
    structure factors' buffers: four separate evaluations more than doubled the program's temporary memory on 4iid)."""
    signed = [z for probe in probes for z in (probe, jax.tree_util.tree_map(lambda a: -a, probe))]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *signed)
    f = jax.lax.map(lambda z: f_model_of(_moved(z, params, problem), problem, state), stacked)
    out = [jnp.sum(weights * jnp.abs((f[2 * k] - f[2 * k + 1]) / 2) ** 2) for k in range(len(probes))]
    return out + [jnp.zeros((), weights.dtype)] * (2 - len(out))


def _calibration(true_quadratic, closed_quadratic):
    """Scale of a closed-form diagonal from the two traces, clipped to [0.2, 5]."""
    return jnp.clip(true_quadratic / jnp.maximum(closed_quadratic, 1e-30), 0.2, 5.0)


class _Shift(NamedTuple):
    """The Gauss–Newton variables: Cartesian shifts (n, 3) Å and shifts of the B parameters (n,) (zero and unused
    without B)."""

    xyz: jax.Array
    b: jax.Array


def _moved(z: _Shift, params: Params, problem: Problem) -> Params:
    """``params`` with every atom shifted by z.xyz (Cartesian Å) and its B parameter by z.b."""
    return params._replace(xyz_frac=params.xyz_frac + z.xyz @ problem.maps.frac.T, b_raw=params.b_raw + z.b)


def gauss_newton_steps(params: Params, problem: Problem, state: XrayState, n_steps, max_cg=MAX_CG, cg_rtol=CG_RTOL, rtol=0.0,
                       calibration=None, target: str = "ml", with_b: bool = False):
    """Up to ``n_steps`` Gauss–Newton steps of the coordinates, and with ``with_b`` of the isotropic B parameters
    (an isotropic ADP model: ``params.b_raw`` is each atom's B), everything else held; see the module docstring.

    Args:
        n_steps, max_cg, cg_rtol, rtol: traced numbers: steps; CG iterations per step and its relative residual;
            stop once a step lowers E_total by less than ``rtol`` × |E_total|.
        calibration: (2,) the calibrations of an earlier call to reuse (traced; the default, or 0, measures them:
            four F_model evaluations).  They are a property of the structure (phase averages, symmetry, overlap of
            neighbours), not of the current shifts: 4iid 1.135 for the coordinates at the shaken start.
        target: the X-ray target ("ml"; "ls" uses the same curvature, calibrated the same way).

    Returns:
        (params, :class:`GaussNewtonStats`): every accepted step lowers E_total; no atom moves more than MAX_SHIFT Å
        in one step.
    """
    n = params.xyz_frac.shape[0]
    dt = params.xyz_frac.dtype
    zero = _Shift(jnp.zeros((n, 3), dt), jnp.zeros((n,), dt))
    weights = fisher_weights(problem, state)
    d_x, d_b = xray_curvature(params, problem, state, weights)  # B and occupancies barely move: once per call
    key = jax.random.PRNGKey(0)
    v = jax.random.rademacher(key, (n, 3), dtype=dt)
    vb = jax.random.rademacher(jax.random.fold_in(key, 1), (n,), dtype=dt)
    h, h_b = jnp.asarray(CALIBRATION_STEP, dt), jnp.asarray(CALIBRATION_STEP_B, dt)
    db_draw = jax.nn.sigmoid(params.b_raw)  # B = b_min + softplus(b_raw)
    d_b = d_b * db_draw**2

    def measure():
        q_x, q_b = _fisher_quadratics(params, problem, state, weights, [_Shift(h * v, zero.b)]
                                      + ([_Shift(zero.xyz, h_b * vb)] if with_b else []))
        return jnp.stack([_calibration(q_x / h**2, 3.0 * jnp.sum(d_x)),
                          _calibration(q_b / h_b**2, jnp.sum(d_b)) if with_b else jnp.ones((), dt)])

    given = jnp.zeros((2,), dt) if calibration is None else jnp.asarray(calibration, dt)
    calibration = jax.lax.cond(jnp.all(given > 0), lambda: given, measure)
    d_x, d_b = calibration[0] * d_x, calibration[1] * d_b
    w_a = state.w_a
    free_b = jnp.asarray(1.0 if with_b else 0.0, dt)
    ridge_x = DAMPING * jnp.mean(d_x)
    ridge_b = DAMPING * jnp.mean(d_b)

    def energy(z, p):
        return total_energy(_moved(z, p, problem), problem, state, target)

    def value_and_grad(z, p):
        e, g = jax.value_and_grad(energy)(z, p)
        return e, g._replace(b=g.b * free_b)

    def residuals(u, p):
        xyz, _ = atom_xyz(_moved(_Shift(u, zero.b), p, problem), problem.maps)
        return jnp.sqrt(w_a) * geometry_residuals(xyz, problem.restraints, state.nonbonded, problem.geo_weights,
                                                  problem.maps.orth, problem.maps.frac)

    def adp_energy(b, p):
        return problem.w_b * adp_restraint_energy(_moved(_Shift(zero.xyz, b), p, problem), problem)

    g_diag = geometry_curvature_guess(problem, n, w_a)
    m_x = 1.0 / (d_x + g_diag + ridge_x)
    m_b = free_b / (d_b + ridge_b)

    def step(c):
        i, n_eval, n_cg, p, e, g, _ = c
        _, jvp = jax.linearize(lambda u: residuals(u, p), zero.xyz)
        vjp = jax.linear_transpose(jvp, zero.xyz)
        _, h_adp = jax.linearize(jax.grad(lambda b: adp_energy(b, p)), zero.b)

        def apply_a(vz):
            gn = 2.0 * vjp(jvp(vz.xyz))[0]
            ab = free_b * ((d_b + ridge_b) * vz.b + h_adp(vz.b * free_b))
            return _Shift((d_x + ridge_x)[:, None] * vz.xyz + gn, ab)

        delta, k = _pcg(apply_a, jax.tree_util.tree_map(lambda a: -a, g), _Shift(m_x[:, None], m_b), max_cg, cg_rtol)
        biggest = jnp.max(jnp.sqrt(jnp.sum(delta.xyz**2, axis=1)))
        biggest_b = jnp.max(jnp.abs(delta.b * db_draw))
        cut = jnp.minimum(MAX_SHIFT / jnp.maximum(biggest, 1e-12), MAX_B_SHIFT / jnp.maximum(biggest_b, 1e-12))
        delta = jax.tree_util.tree_map(lambda a: a * jnp.minimum(1.0, cut), delta)
        slope = _dot(g, delta)

        def trial(t):
            j, alpha, _, _, _ = t
            e1, g1 = value_and_grad(jax.tree_util.tree_map(lambda a: alpha * a, delta), p)
            ok = jnp.isfinite(e1) & (e1 <= e + ARMIJO_C1 * alpha * slope)
            return (j + 1, jnp.where(ok, alpha, 0.5 * alpha), ok, e1, g1)

        t0 = (jnp.zeros((), jnp.int32), jnp.ones((), dt), jnp.asarray(False), e, g)
        j, alpha, ok, e1, g1 = jax.lax.while_loop(lambda t: ~t[2] & (t[0] <= MAX_HALVINGS) & (slope < 0), trial, t0)
        p1 = _moved(jax.tree_util.tree_map(lambda a: jnp.where(ok, alpha, 0.0) * a, delta), p, problem)
        small = (rtol > 0) & (e - e1 <= rtol * jnp.abs(e1))
        keep = lambda a, b: jnp.where(ok, a, b)  # noqa: E731
        return (i + ok.astype(jnp.int32), n_eval + j, n_cg + k, jax.tree_util.tree_map(keep, p1, p),
                keep(e1, e), jax.tree_util.tree_map(keep, g1, g), ~ok | small)

    e0, g0 = value_and_grad(zero, params)
    init = (jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32), jnp.zeros((), jnp.int32), params, e0, g0, ~jnp.isfinite(e0))
    i, n_eval, n_cg, p, e, _, _ = jax.lax.while_loop(lambda c: (c[0] < n_steps) & ~c[6], step, init)
    return p, GaussNewtonStats(i, n_eval, n_cg, calibration, e0, e, jnp.sqrt(jnp.sum(g0.xyz**2)))


def _dot(a, b):
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
