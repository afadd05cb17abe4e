"""Per-atom coordinate and B uncertainties from the curvature of the energy; sensitivities.

**Which curvature.** The ML X-ray target is a sum of −log P(F_obs | F_model) (see
:mod:`jaxrefine.xray.targets`), a proper negative log-likelihood.  The restraint energy is
Σ ((x − x₀)/σ)², twice the −log prior of Gaussian restraints (see :mod:`jaxrefine.refine.energy`), so
the negative log-posterior is

    E_post = E_xray + ½ · E_geometry + ½ · w_B · E_ADP          (weights="posterior", the default)

and the covariance of the parameters is approximated by H⁻¹, H = ∇²E_post at the refined model
(Laplace approximation; e.g. MacKay 2003, Information Theory, Inference and Learning Algorithms,
ch. 27).  ``weights="refinement"`` uses the refinement's own E_total (w_A as refined); it is the
Hessian whose inverse gives implicit derivatives of the refined parameters.

**Gauss–Newton by default.** H is positive definite only near E_post's own minimum.  A model refined by another
program (other restraints, other weights), or by jaxrefine with the refinement's w_A, is not there: on the
deposited 4xof the Hessian has directions of negative curvature (Rayleigh quotients down to −100 along the CG
directions, in the X-ray term alone), and CG solves with it diverge; on 5e5z shaken by 0.3 Å its smallest
eigenvalue is −0.16 × the largest.  The uncertainties therefore use, unless ``curvature="exact"``, the
(generalised) Gauss–Newton matrix G = Jᵀ C J + H_ADP, J the Jacobian of the residuals (|F_model| of each work
reflection, the geometry residuals r with E_geometry = Σ r², the NCS distance differences), C each term's own
second derivative in its residual, floored at 0 (ML: ∂²(−log P(Fo | |Fm|))/∂|Fm|² at the model; LS: w k² with k
held; geometry: 2 w_A; NCS: the Geman–McClure ρ''), H_ADP the exact Hessian of the quadratic B restraints.  G is
positive semi-definite at any model; it leaves out the residuals' own curvature (Σ ∂E/∂r · ∇²r), small where the
model fits: at the minimum of 5e5z σ_r(G)/σ_r(H) is 1.03 in the median (0.89–1.11 per atom).  It is the normal
matrix whose inverse gives the esds of full-matrix least squares (e.g. SHELXL; Sheldrick 2008, Acta Cryst. A64,
112), and the generalised Gauss–Newton matrix of Schraudolph 2002 (Neural Comput. 14, 1723).  Implicit
derivatives (below) need the exact H at a minimum and use it.

**Parameters.** Cartesian coordinate shifts (Å, the engine's "shift" variables of
:func:`jaxrefine.refine.energy.apply_shifts`) and B shifts in Å² (mapped onto the engine's
positive B parameter), so that an atom whose B sits at the floor ``refine.b_min`` keeps a finite curvature.
A floating origin (polar space groups: P1, P2₁, C2, P4₁ ...) leaves E unchanged under a translation
of all atoms; those directions are projected out (uncertainties relative to a fixed origin).

**Two estimates.**
1. Block-diagonal: the per-atom 4×4 blocks (x, y, z, B) of G (or H) from matrix-vector products (G v: the
   transpose of one VJP gives J v, a second VJP Jᵀ C J v; H v: reverse over reverse, ``jax.grad`` of ``∇E · v``).
   Atoms are coloured so that two atoms of a colour are more than ``cutoff`` Å apart (symmetry mates
   included); one probe per colour and component then gives the blocks of all atoms of that colour at
   once (Curtis, Powell & Reid 1974, IMA J. Appl. Math. 13, 117: column grouping for sparse derivatives).
   The X-ray term still couples atoms beyond the cutoff a little (3% of a block on 5e5z at 6 Å;
   ``cutoff=inf`` is exact).  Inverting each block ignores coupling between atoms and therefore gives a lower bound of each atom's variance
   (the inverse of a Schur complement dominates the inverse of the diagonal block).
2. Coupled: the per-atom blocks of G⁻¹ (H⁻¹), probed colour by colour with random signs
   (probing: Tang & Saad 2012, Numer. Linear Algebra Appl. 19, 485; random signs as in Hutchinson
   1990, Commun. Stat. Simul. 19, 433, make it unbiased), H⁻¹v by conjugate gradients
   (:func:`solve`, a batched numpy loop over HVPs) preconditioned by the inverse blocks.  Only atoms of one colour
   (≥ ``cutoff`` apart) leak into each other's estimate.  Each variance is clipped below at the
   block-diagonal bound.
3. Exact (``method="dense"``; what ``"auto"`` chooses up to :data:`DENSE_MAX_PARAMS` parameters): the whole
   H from one HVP per parameter, restricted to the active components and the fixed-origin subspace, and its
   pseudo-inverse by an eigendecomposition.  The block-diagonal estimate is then the inverse of H's
   exact diagonal blocks.  Implicit derivatives use the same inverse instead of CG solves.

**Overall figure.** Cruickshank's diffraction-component precision index (Cruickshank 1999, Acta
Cryst. D55, 583, eqs. 27 and 28 in the R_free form of Blow 2002, Acta Cryst. D58, 792):

    DPI_free = sqrt(N_atoms / N_obs) · C^(−1/3) · d_min · R_free
    DPI_R    = sqrt(N_atoms / (N_obs − N_params)) · C^(−1/3) · d_min · R

with N_obs the work reflections, N_params = 4 N_atoms, C the completeness to d_min.  DPI is σ(r), the
positional error of an atom of average B; compare it with the RMS over atoms of σ_r = sqrt(σx²+σy²+σz²).

**Arguments.** ``params`` is the engine's Params pytree; ``problem`` (or ``ps``) is always the pair
(problem, state) of :mod:`jaxrefine.problem`: the static arrays and the X-ray state (mask, scales, σA,
neighbours, w_A) at which the curvature is taken.

**Sensitivities** by implicit differentiation at the minimum (no unrolling): for θ* = argmin E(θ, λ),
dθ*/dλ = −H⁻¹ ∂²E/∂θ∂λ, so for a scalar φ(θ*), dφ/dλ = −∂/∂λ [uᵀ ∇_θ E(θ*, λ)] with H u = ∇_θ φ
(one CG solve per φ, any number of λ at the cost of one gradient).  Scales, σA and the solvent mask
are held at their refined values.
"""
from __future__ import annotations

import logging
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("jaxrefine")

COLOUR_CUTOFF = 6.0  # Å: beyond this the restraints (1–4 pairs, non-bonded contacts) do not couple two atoms
CG_TOL = 1e-5  # relative residual of the CG solves (implicit derivatives: the 1e-3 below is not enough there)
PROBE_CG_TOL = 5e-3  # ... of the probing solves of the coupled esds, in the preconditioner's norm: on 4xof (788 atoms)
# every atom's variance within 3% of the converged one (30 iterations; 1e-2: 11%, 20 iterations), below the probing
# noise of a few %
CG_MAXITER = 400
PROBE_RESIDUAL_WARN = 0.05  # a probing solve left above this relative residual: its esds are not to be trusted
IMPLICIT_RESIDUAL_WARN = 1e-3  # an implicit-derivative solve left above this (CG_TOL asks for 1e-5)
HVP_BATCH = 8  # Hessian-vector products evaluated together (vmap)
# Parameters (4 per atom) up to which the coupled estimate and the implicit solves use the exact Hessian, one
# HVP per parameter and a dense eigendecomposition (method "auto"): on 5e5z (188 parameters) 188 HVPs against
# 92 for the blocks plus 92 probes x their CG iterations (14 s against 53 s, compilation included), and exact.  At 2400 the matrix is 46 MB; beyond, its
# memory and eigendecomposition grow as n² and n³, while probing's HVPs grow with the colours, not the atoms.
DENSE_MAX_PARAMS = 2400
B_AT_FLOOR = 0.05  # Å²: an atom whose B is within this of refine.b_min sits at a bound; its B is held fixed
EIG_FLOOR = 1e-8  # eigenvalues of a block below this × its largest are floored (not positive definite)
WEIGHTS = ("posterior", "refinement")
CURVATURES = ("gauss-newton", "exact")


# ------------------------------------------------------------------ the one link to the engine
# Everything below reaches the engine's energy through these two functions, so that a change of the
# energy's signature is one edit here.
def _engine():
    from ..refine import energy

    return energy


def shifted_params(u, params, ps):
    """Parameters after the shifts ``u`` (n, 4): Cartesian Å (x, y, z) and B (Å²) of every atom.

    ``ps`` is the pair (problem, state) of the engine; B shifts act on the isotropic B parameter.
    """
    en = _engine()
    problem, _ = ps
    b = jnp.maximum(jax.nn.softplus(params.b_raw) + u[:, 3], 1e-6)  # B − b_min after the shift (a line search may overshoot)
    d_raw = b + jnp.log(-jnp.expm1(-b)) - params.b_raw  # softplus⁻¹(b) − b_raw, stable for small and large b
    shifts = en.zero_shifts(params)._replace(xyz_frac=u[:, :3], b_raw=d_raw)
    return en.apply_shifts(shifts, en.block_mask(params, ("xyz", "b")), params, problem)


def flat_energy(u, params, ps, target: str = "ml"):
    """E_total at the shifts ``u`` (n, 4) (see :func:`shifted_params`); ``ps`` = (problem, state)."""
    problem, state = ps
    return _engine().total_energy(shifted_params(u, params, ps), problem, state, target)


_flat_grad = jax.jit(jax.grad(flat_energy), static_argnames="target")


def starting_w_a(setup, ps, target: str = "ml") -> float:
    """The engine's starting w_A (as :func:`jaxrefine.refine.engine.choose_initial_w_a`: the configured number,
    or the balance of gradient norms of :func:`jaxrefine.refine.weights.initial_w_a`) for ``ps`` = (problem,
    state), from one gradient of :func:`flat_energy` (w_A = 0: E_xray, whose coordinate gradient is the same
    as over the engine's shifts): no L-BFGS program is compiled for it alone."""
    from ..refine import weights as wmod

    cfg = setup.config
    if cfg.weights.w_a != "auto":
        return float(cfg.weights.w_a)
    problem, state = ps
    params = setup.params
    g = _flat_grad(_zeros(params), params, (problem, state._replace(w_a=jnp.zeros_like(state.w_a))), target=target)
    target_rmsz = wmod.target_rmsz_for(setup.refl.d_min, cfg.weights.target_rmsz_bond)
    return wmod.initial_w_a(float(jnp.linalg.norm(g[:, :3])), problem.restraints, setup.model.n_atoms, target_rmsz)


def weighted_problem(ps, weights: str = "posterior"):
    """(problem, state) whose E_total is −log posterior (``posterior``) or the refinement's (``refinement``)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; choose one of {', '.join(WEIGHTS)}")
    if weights == "refinement":
        return ps
    problem, state = ps
    half = jnp.asarray(0.5, state.w_a.dtype)
    return problem._replace(w_b=half * problem.w_b), state._replace(w_a=half)


def _model_f(params, ps):
    from ..problem import f_model_of

    return f_model_of(params, *ps)


def r_free_of(u, params, ps):
    """R-free (Σ_free |Fo − |Fm|| / Σ_free Fo) at the shifts ``u``, scales held fixed (differentiable a.e.)."""
    fm = _model_f(shifted_params(u, params, ps), ps)
    x = ps[0].xray
    fm_abs = jnp.sqrt(fm.real**2 + fm.imag**2 + 1e-12)
    free = x.free.astype(x.f_obs.dtype)
    return jnp.sum(free * jnp.abs(x.f_obs - fm_abs)) / jnp.sum(free * x.f_obs)


# ------------------------------------------------------------------ Hessian-vector products
def _zeros(params):
    return jnp.zeros((params.xyz_frac.shape[0], 4), params.xyz_frac.dtype)


def _hvp(v, params, problem, target):
    # reverse over reverse: the FFT spreading has a custom VJP (xray/fft_grid.py), which
    # forward-mode autodiff cannot enter; H v = ∇_u (∇E(u) · v)
    g = lambda u: jnp.vdot(jax.grad(flat_energy)(u, params, problem, target), v)  # noqa: E731
    return jax.grad(g)(_zeros(params))


def _curvature_floor(elementwise, x0, mask):
    """(n,) max(d²/dx² elementwise(x), 0) at ``x0`` for a sum of per-element functions, 0 where ``mask`` is off
    (one forward-over-reverse pass: the Hessian of a separable sum is diagonal)."""
    d2 = jax.jvp(jax.grad(lambda x: jnp.sum(elementwise(x))), (x0,), (jnp.ones_like(x0),))[1]
    return jnp.where(mask, jnp.nan_to_num(jnp.maximum(d2, 0.0), posinf=0.0), 0.0)


def _gn_features(u, params, ps):
    """What E_post's Gauss–Newton matrix is built from, at the shifts ``u``: (|F_model| (n_refl,), the geometry
    residuals (E_geometry = Σ r²), the NCS distance differences / σ (empty without NCS))."""
    from ..problem.params import atom_xyz
    from ..restraints.geometry import geometry_residuals
    from ..restraints.ncs import ncs_deltas

    problem, state = ps
    p = shifted_params(u, params, ps)
    fm = _model_f(p, ps)
    amp = jnp.sqrt(fm.real**2 + fm.imag**2 + 1e-12)
    xyz = atom_xyz(p, problem.maps)[0]
    r = geometry_residuals(xyz, problem.restraints, state.nonbonded, problem.geo_weights, problem.maps.orth, problem.maps.frac)
    z = jnp.zeros((0,), xyz.dtype) if problem.ncs is None else ncs_deltas(xyz, problem.ncs.term) / problem.ncs.term.sigma
    return amp, r, z


def _gn_weights(amp0, z0, ps, target):
    """(per-reflection weights c_h, per-NCS-pair weights) of the Gauss–Newton matrix: each term's own curvature in
    its residual (ML: ∂²(−log P(Fo | |Fm|))/∂|Fm|² at the model; LS: w k² with k held), floored at 0."""
    from ..restraints.ncs import geman_mcclure
    from ..xray.targets import ls_scale, ls_weights, ml_amplitude_nll

    problem, state = ps
    x = problem.xray
    work = x.work > 0
    if target == "ml":
        c_amp = _curvature_floor(lambda a: jnp.where(work, ml_amplitude_nll(
            x.f_obs, x.sig_f_obs, a, state.sigma_a.d, state.sigma_a.s, x.centric, x.epsilon), 0.0), amp0, work)
        c_amp = c_amp * x.work
    else:  # ½ Σ w (Fo − k|Fm|)², k = Σ w Fo|Fm| / Σ w |Fm|² held at the model's
        w = ls_weights(x.sig_f_obs, x.work)
        c_amp = w * ls_scale(x.f_obs, amp0, w) ** 2
    if problem.ncs is None:
        return c_amp, jnp.zeros_like(z0)
    term = problem.ncs.term
    c_z = _curvature_floor(lambda z: geman_mcclure(z, term.saturation), z0, term.mask > 0)
    return c_amp, c_z * term.mask * problem.ncs.weight * state.w_a


def _gn_products(vs, params, problem, target):
    """G v for a batch ``vs`` (k, n, 4), G the (generalised) Gauss–Newton matrix of E_post (module docstring):
    Jᵀ C J over the amplitudes, the geometry residuals and the NCS differences, plus the exact Hessian of the
    (quadratic) B restraints.  One linearisation for the batch; J v is the transpose of the VJP (forward mode
    cannot enter the FFT spreading's custom VJP), Jᵀ(C J v) the VJP: two linear passes per direction."""
    from ..problem.adp_model import adp_restraint_energy

    prob, state = problem
    zero = _zeros(params)
    feats, vjp = jax.vjp(lambda u: _gn_features(u, params, problem), zero)
    c_amp, c_z = _gn_weights(feats[0], feats[2], problem, target)
    jvp = jax.linear_transpose(vjp, feats)
    adp_grad = jax.grad(lambda u: prob.w_b * adp_restraint_energy(shifted_params(u, params, problem), prob))

    def one(v):
        ja, jr, jz = jvp((v,))[0]
        (g,) = vjp((c_amp * ja, 2.0 * state.w_a * jr, c_z * jz))
        return g + jax.jvp(adp_grad, (zero,), (v,))[1]

    return jax.vmap(one)(vs)


@partial(jax.jit, static_argnames=("target", "curvature"))
def hvp_batch(vs, params, problem, target: str = "ml", curvature: str = "exact"):
    """H v for a batch of directions ``vs`` (k, n, 4) at the parameters (zero shifts); ``curvature`` "exact" (the
    Hessian of E) or "gauss-newton" (its Gauss–Newton matrix, positive semi-definite: :func:`_gn_products`)."""
    if curvature == "gauss-newton":
        return _gn_products(vs, params, problem, target)
    return jax.vmap(_hvp, in_axes=(0, None, None, None))(vs, params, problem, target)


def _project(v, basis):
    """Remove uniform translations along the floating-origin directions ``basis`` (k, 3) from (.., n, 4)."""
    if basis.shape[0] == 0:
        return v
    mean = jnp.mean(v[..., :3], axis=-2)  # (.., 3)
    shift = (mean @ basis.T) @ basis  # (.., 3)
    return v.at[..., :3].add(-shift[..., None, :])


def floating_origin(crystal) -> np.ndarray:
    """(k, 3) orthonormal Cartesian directions along which the origin floats (k = 0 for most groups).

    A translation t is free when every rotation of the space group leaves it unchanged, R t = t
    (fractional), i.e. t spans the null space of the stacked (R − I).
    """
    a = np.concatenate([np.asarray(r, float) - np.eye(3) for r in crystal.rot])
    _, s, vt = np.linalg.svd(a)
    null = vt[np.sum(s > 1e-6):]
    if len(null) == 0:
        return np.zeros((0, 3))
    cart = null @ np.asarray(crystal.orth, float).T
    q, _ = np.linalg.qr(cart.T)
    return q.T[: len(null)]


# ------------------------------------------------------------------ colouring
def colour_atoms(xyz_cart, crystal, cutoff: float = COLOUR_CUTOFF) -> np.ndarray:
    """Greedy colouring: (n,) int colours, two atoms of one colour ≥ ``cutoff`` Å apart (symmetry mates too).

    ``cutoff`` = inf gives every atom its own colour (exact blocks).
    """
    from scipy.spatial import cKDTree

    xyz = np.asarray(xyz_cart, float)
    n = len(xyz)
    if not np.isfinite(cutoff):
        return np.arange(n)
    frac = crystal.to_frac(xyz)
    centre = frac.mean(0)
    tree = cKDTree(xyz)
    nbrs = [set() for _ in range(n)]
    shifts = np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1])).reshape(3, -1).T
    for k in range(crystal.n_ops):
        mate = frac @ np.asarray(crystal.rot[k]).T + crystal.trans[k]
        mate = mate + np.round(centre - mate.mean(0))
        for s in shifts:
            for i, js in enumerate(cKDTree(crystal.to_cart(mate + s)).query_ball_tree(tree, cutoff)):
                for j in js:
                    if j != i:
                        nbrs[i].add(j)
                        nbrs[j].add(i)
    colour = -np.ones(n, int)
    for i in np.argsort([-len(s) for s in nbrs], kind="stable"):
        used = {colour[j] for j in nbrs[i]}
        c = 0
        while c in used:
            c += 1
        colour[i] = c
    return colour


def hessian_blocks(params, problem, target: str = "ml", colours=None, batch: int = HVP_BATCH, curvature: str = "exact"):
    """Per-atom 4×4 blocks (x, y, z in Å; B in Å²) of H (or of its Gauss–Newton matrix: ``curvature``), (n, 4, 4),
    from 4 HVPs per colour."""
    n = params.xyz_frac.shape[0]
    colours = np.arange(n) if colours is None else np.asarray(colours)
    n_col = int(colours.max()) + 1
    dtype = params.xyz_frac.dtype
    probes = [(c, k) for c in range(n_col) for k in range(4)]
    blocks = np.zeros((n, 4, 4))
    for start in range(0, len(probes), batch):
        chunk = probes[start:start + batch]
        vs = np.zeros((batch, n, 4))
        for b, (c, k) in enumerate(chunk):
            vs[b, colours == c, k] = 1.0
        hv = np.asarray(hvp_batch(jnp.asarray(vs, dtype), params, problem, target, curvature), float)
        for b, (c, k) in enumerate(chunk):
            sel = colours == c
            blocks[sel, :, k] = hv[b, sel, :]
    return 0.5 * (blocks + blocks.transpose(0, 2, 1))


def invert_blocks(blocks):
    """(inverse blocks, number of blocks that were not positive definite); small eigenvalues floored."""
    w, v = np.linalg.eigh(blocks)
    top = np.maximum(w.max(-1, keepdims=True), 1e-30)
    bad = (w <= EIG_FLOOR * top).any(-1)
    w = np.maximum(w, EIG_FLOOR * top)
    return np.einsum("nij,nj,nkj->nik", v, 1.0 / w, v), int(bad.sum())


# ------------------------------------------------------------------ the CG preconditioner
# The per-atom blocks alone leave the probing solves ill-conditioned where bonds tie atoms together: a bond is ~100×
# stiffer along itself than the X-ray term moves an atom, so a residue moves as a body far more easily than its atoms
# do alone, which per-atom blocks cannot see (4iid: ~150 CG iterations a batch, 4xof 33).  The preconditioner M adds
# the off-diagonal atom blocks of the bonded geometry's Gauss–Newton matrix 2 w_A J_bᵀ J_b (bonds, angles, torsions,
# planes, chirals: the non-bonded contacts join distant residues, which fills the factors 50× and gained nothing) to
# the exact per-atom blocks of the curvature, and is factorised once (sparse LU): 4iid 36 iterations a batch
# (factors 1.6 M non-zeros, 0.1 s), 4xof 14, the same variances to 0.2 % (benchmarks/README.md, session 34).
JVP_COLOURS = 16  # colours whose forward products (3 each) are evaluated together for the bonded Jacobian


def bonded_rows_atoms(restraints) -> np.ndarray:
    """(n_rows, k) atoms of each row of :func:`jaxrefine.restraints.geometry.geometry_residuals` without the
    non-bonded pairs (bonds, angles, torsions, one row per plane atom slot, chirals), -1 padded."""
    pl = np.where(np.asarray(restraints.plane.atom_mask) > 0, np.asarray(restraints.plane.idx), -1)
    blocks = [np.asarray(restraints.bond.idx), np.asarray(restraints.angle.idx), np.asarray(restraints.torsion.idx),
              np.repeat(pl, pl.shape[1], axis=0), np.asarray(restraints.chiral.idx)]  # a plane row: all its atoms
    k = max(b.shape[1] for b in blocks)
    return np.concatenate([np.pad(b, ((0, 0), (0, k - b.shape[1])), constant_values=-1) for b in blocks]).astype(np.int64)


def _bonded_residuals(u, params, ps):
    from ..problem.params import atom_xyz
    from ..restraints.geometry import geometry_residuals

    problem, _ = ps
    xyz = atom_xyz(shifted_params(u, params, ps), problem.maps)[0]
    return geometry_residuals(xyz, problem.restraints, None, problem.geo_weights)


@jax.jit
def _bonded_jvps(tangents, params, ps):
    return jax.vmap(lambda t: jax.jvp(lambda u: _bonded_residuals(u, params, ps), (_zeros(params),), (t,))[1])(tangents)


def bonded_jacobian(params, ps, colours):
    """(J (n_rows, 3n) scipy sparse, number of rows left out): the Jacobian of the bonded geometry residuals with
    respect to the atoms' Cartesian shifts, from one forward product per colour and axis (a row's atoms are within
    the colouring distance, so each has its own colour; a row with two atoms of one colour is left out)."""
    import scipy.sparse as sparse

    n = params.xyz_frac.shape[0]
    colours = np.asarray(colours)
    n_col = int(colours.max()) + 1
    atoms = bonded_rows_atoms(ps[0].restraints)
    col = np.where(atoms >= 0, colours[np.maximum(atoms, 0)], -1)
    first = np.ones(atoms.shape, bool)  # an atom listed twice in a row counts once
    clash = np.zeros(len(atoms), bool)
    for m in range(1, atoms.shape[1]):
        same = atoms[:, :m] == atoms[:, m:m + 1]
        first[:, m] = ~same.any(1)
        clash |= ((col[:, :m] == col[:, m:m + 1]) & ~same & (col[:, m:m + 1] >= 0)).any(1)
    r, m = np.nonzero((atoms >= 0) & (col >= 0) & first & ~clash[:, None])
    a, c = atoms[r, m], col[r, m]
    vals = np.zeros((len(r), 3))
    per = JVP_COLOURS
    for c0 in range(0, n_col, per):  # the products of a few colours at a time (4iid: 246k rows each)
        tangents = np.zeros((3 * per, n, 4))
        for c1 in range(c0, min(c0 + per, n_col)):
            for k in range(3):
                tangents[3 * (c1 - c0) + k, colours == c1, k] = 1.0
        jv = np.asarray(_bonded_jvps(jnp.asarray(tangents, params.xyz_frac.dtype), params, ps), float).reshape(per, 3, -1)
        sel = (c >= c0) & (c < c0 + per)
        vals[sel] = jv[c[sel] - c0, :, r[sel]]
    rows = np.repeat(r, 3)
    cols = (3 * a[:, None] + np.arange(3)).reshape(-1)
    vals = vals.reshape(-1)
    keep = vals != 0
    return sparse.csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(len(atoms), 3 * n)), int(clash.sum())


def preconditioner_matrix(blocks, comp, params, ps, colours):
    """(M (4n, 4n) scipy sparse, rows left out of J_b): the per-atom blocks (n, 4, 4) of the curvature with the
    off-diagonal atom blocks of 2 w_A J_bᵀ J_b (:func:`bonded_jacobian`; ``ps``'s w_A), in the order (atom, x y z B);
    held components (``comp`` False) get a unit diagonal and nothing else."""
    import scipy.sparse as sparse

    n = blocks.shape[0]
    j_b, n_left = bonded_jacobian(params, ps, colours)
    g = (2.0 * float(ps[1].w_a) * (j_b.T @ j_b)).tocoo()
    off = (g.row // 3) != (g.col // 3)
    rows, cols = 4 * (g.row[off] // 3) + g.row[off] % 3, 4 * (g.col[off] // 3) + g.col[off] % 3
    flat = np.asarray(comp, bool).reshape(-1)
    ok = flat[rows] & flat[cols]
    b = _held_as_unit(blocks, comp)
    idx = np.arange(4)
    bi = np.broadcast_to(4 * np.arange(n)[:, None, None] + idx[None, :, None], b.shape).reshape(-1)
    bj = np.broadcast_to(4 * np.arange(n)[:, None, None] + idx[None, None, :], b.shape).reshape(-1)
    m = sparse.coo_matrix((np.concatenate([b.reshape(-1), g.data[off][ok]]),
                           (np.concatenate([bi, rows[ok]]), np.concatenate([bj, cols[ok]]))), shape=(4 * n, 4 * n))
    return m.tocsc(), n_left


def sparse_preconditioner(blocks, comp, params, ps, colours):
    """z = M⁻¹ v for a batch v (k, n, 4) (:func:`preconditioner_matrix`, factorised once by SuperLU), or None
    where M cannot be factorised (the caller keeps the inverse blocks)."""
    from scipy.sparse.linalg import splu

    m, n_left = preconditioner_matrix(blocks, comp, params, ps, colours)
    try:
        lu = splu(m, permc_spec="MMD_AT_PLUS_A")
    except RuntimeError as err:  # exactly singular
        log.warning("uncertainty: the bonded preconditioner is singular (%s); per-atom blocks instead", err)
        return None
    if n_left:
        log.info("uncertainty: %d restraint rows with two atoms of one colour left out of the preconditioner", n_left)
    n = blocks.shape[0]
    return lambda v: lu.solve(np.asarray(v, float).reshape(len(v), 4 * n).T).T.reshape(len(v), n, 4)


def dense_hessian(params, problem, target: str = "ml", batch: int = HVP_BATCH, curvature: str = "exact") -> np.ndarray:
    """The whole Hessian (n, 4, n, 4) at the parameters (zero shifts), one HVP per parameter, symmetrised (or its
    Gauss–Newton matrix: ``curvature``)."""
    n = params.xyz_frac.shape[0]
    dtype = params.xyz_frac.dtype
    cols = np.zeros((4 * n, n, 4))
    for start in range(0, 4 * n, batch):
        vs = np.zeros((batch, 4 * n))
        k = min(batch, 4 * n - start)
        vs[np.arange(k), start + np.arange(k)] = 1.0
        hv = hvp_batch(jnp.asarray(vs.reshape(batch, n, 4), dtype), params, problem, target, curvature)
        cols[start:start + k] = np.asarray(hv, float)[:k]
    h = cols.reshape(4 * n, 4 * n)
    return (0.5 * (h + h.T)).reshape(n, 4, n, 4)


def dense_inverse(h, active, basis) -> tuple:
    """(pseudo-inverse (n, 4, n, 4) of H restricted to the ``active`` (n, 4) components and to the
    fixed-origin subspace (``basis`` (k, 3) floating-origin directions), number of eigenvalues floored).

    Held components get zero rows and columns; eigenvalues below EIG_FLOOR × the largest are dropped
    (the floating origin's and the held components' null directions) and counted when they are negative.
    """
    n = h.shape[0]
    keep = np.asarray(active, float).ravel()
    a = np.asarray(h, float).reshape(4 * n, 4 * n) * keep[:, None] * keep[None, :]
    proj = np.eye(4 * n)
    for e in np.asarray(basis, float):
        v = np.zeros((n, 4))
        v[:, :3] = e
        v = v.ravel() * keep
        if v @ v > 0:
            v /= np.sqrt(v @ v)
            proj -= np.outer(v, v)
    a = proj @ a @ proj
    w, vec = np.linalg.eigh(0.5 * (a + a.T))
    top = max(float(np.abs(w).max()), 1e-30)
    good = w > EIG_FLOOR * top
    n_neg = int((w < -EIG_FLOOR * top).sum())
    inv = (vec[:, good] / w[good]) @ vec[:, good].T
    return inv.reshape(n, 4, n, 4), n_neg


def choose_method(method: str, n_params: int) -> str:
    """"dense" or "probe" for ``method`` ("auto", "dense" or "probe") and the number of active parameters."""
    if method not in ("auto", "dense", "probe"):
        raise ValueError(f"uncertainty method {method!r}: expected auto, dense or probe")
    if method == "auto":
        return "dense" if n_params <= DENSE_MAX_PARAMS else "probe"
    return method


def active_components(params, ps) -> np.ndarray:
    """(n, 4) bool: the x, y, z and B of atoms with occupancy > 0; B only where it is above the floor b_min
    (a parameter at a bound has no Gaussian uncertainty; it is held fixed and reported as unknown)."""
    occ = np.asarray(ps[0].maps.occ0, float) > 0
    b_free = np.asarray(jax.nn.softplus(params.b_raw), float) > B_AT_FLOOR
    return np.concatenate([np.repeat(occ[:, None], 3, 1), (occ & b_free)[:, None]], 1)


# ------------------------------------------------------------------ CG solves
def solve(rhs, params, problem, m_inv, basis, active, target: str = "ml", tol: float = CG_TOL, maxiter: int = CG_MAXITER,
          curvature: str = "exact", norm: str = "plain"):
    """x = H⁺ rhs for a batch (k, n, 4) by preconditioned conjugate gradients (Hestenes & Stiefel 1952;
    Nocedal & Wright 2006, Algorithm 5.3), H restricted to the ``active`` (n,) atoms or (n, 4) components and the fixed-origin
    subspace.  The products H·p go through the compiled :func:`hvp_batch` (one compilation for blocks,
    solves and sensitivities); the iteration itself is a numpy loop over the batch.  A solve that meets
    non-positive curvature (H not positive definite: a model away from the minimum, with ``curvature="exact"``)
    stops there with its residual as it stands.  ``norm``: the residual's relative size as ‖r‖/‖b‖ ("plain") or
    in the preconditioner's norm, sqrt(rᵀMr / bᵀMb) ("preconditioned": the same for coordinate and B components,
    whose plain residuals differ by their units).

    Args:
        m_inv: (n, 4, 4) inverse blocks, or a callable z = M⁻¹ v of a batch (k, n, 4) (the preconditioner:
            :func:`sparse_preconditioner`); basis: (k, 3) floating-origin directions.

    Returns:
        (x (k, n, 4), relative residuals (k,)).
    """
    b = np.asarray(rhs, float)
    keep = np.asarray(active, float)
    keep = keep[:, None] if keep.ndim == 1 else keep
    basis = np.asarray(basis, float)
    m_inv = m_inv if callable(m_inv) else np.asarray(m_inv, float)
    dtype = params.xyz_frac.dtype

    def p_(v):
        return np.asarray(_project(jnp.asarray(v * keep), jnp.asarray(basis))) * keep if len(basis) else v * keep

    def a_(v):
        out = np.zeros_like(v)
        for s in range(0, len(v), HVP_BATCH):
            chunk = np.zeros((HVP_BATCH,) + v.shape[1:])
            chunk[: len(v[s:s + HVP_BATCH])] = v[s:s + HVP_BATCH]
            hv = np.asarray(hvp_batch(jnp.asarray(p_(chunk), dtype), params, problem, target, curvature), float)
            out[s:s + HVP_BATCH] = hv[: len(v[s:s + HVP_BATCH])]
        return p_(out)

    def m_(v):
        return p_(m_inv(p_(v)) if callable(m_inv) else np.einsum("nij,knj->kni", m_inv, p_(v)))

    dot = lambda u, v: np.sum(u * v, axis=(1, 2))  # noqa: E731
    b = p_(b)
    b_norm = np.maximum(np.sqrt(dot(b, b)), 1e-300)
    x = np.zeros_like(b)
    r = b.copy()
    z = m_(r)
    d = z.copy()
    rz = dot(r, z)
    rz0 = np.maximum(rz, 1e-300)
    size = (lambda: np.sqrt(np.maximum(rz, 0.0) / rz0)) if norm == "preconditioned" else (lambda: np.sqrt(dot(r, r)) / b_norm)
    stopped = np.zeros(len(b), bool)
    for _ in range(maxiter):
        res = size()
        if np.all((res < tol) | stopped):
            break
        ad = a_(d)
        stopped |= (res >= tol) & ~(dot(d, ad) > 0)
        live = (res >= tol) & ~stopped
        alpha = np.where(live, rz / np.where(live, dot(d, ad), 1.0), 0.0)[:, None, None]
        x += alpha * d
        r -= alpha * ad
        z = m_(r)
        rz_new = dot(r, z)
        d = z + (rz_new / np.where(rz != 0, rz, 1.0))[:, None, None] * d
        rz = rz_new
    return x, size()


# ------------------------------------------------------------------ the estimates
class Uncertainties(NamedTuple):
    """Per-atom uncertainties (numpy; model order).

    Attributes:
        xyz_esd: (n, 3) σ of x, y, z (Å), coupled estimate.
        b_esd: (n,) σ of B (Å²), coupled estimate.
        sigma_r: (n,) sqrt(σx² + σy² + σz²) (Å), coupled.
        xyz_esd_block, b_esd_block, sigma_r_block: the same from the block-diagonal inverse (lower bounds).
        cov_xyz: (n, 3, 3) coupled covariance blocks (Å²).
        info: dict: n_colours, n_hvp_blocks, n_cg_solves, not_positive_definite, cg_residual_max, seconds, weights.
    """

    xyz_esd: np.ndarray
    b_esd: np.ndarray
    sigma_r: np.ndarray
    xyz_esd_block: np.ndarray
    b_esd_block: np.ndarray
    sigma_r_block: np.ndarray
    cov_xyz: np.ndarray
    info: dict


def _held_as_unit(blocks, comp):
    """The (n, 4, 4) blocks with the held components (``comp`` False) given a unit row and column."""
    blocks = blocks * (comp[:, :, None] & comp[:, None, :])
    idx = np.arange(4)
    blocks[:, idx, idx] = np.where(comp, blocks[:, idx, idx], 1.0)
    return blocks


def _invert_active_blocks(blocks, comp):
    """(inverse blocks, number not positive definite) of the (n, 4, 4) Hessian blocks with the held components
    (``comp`` False) given a unit row and column (their esd is NaN in :func:`_uncertainties_of`)."""
    return invert_blocks(_held_as_unit(blocks, comp))


def _uncertainties_of(cov, m_inv, comp, info) -> Uncertainties:
    """:class:`Uncertainties` from the coupled (n, 4, 4) covariance blocks ``cov`` and the inverse diagonal blocks
    ``m_inv``; entries of held components (``comp`` False) become NaN."""
    held = ~(comp[:, :, None] & comp[:, None, :])
    var = np.diagonal(np.where(held, np.nan, cov), axis1=1, axis2=2)
    var_block = np.diagonal(np.where(held, np.nan, m_inv), axis1=1, axis2=2)
    return Uncertainties(
        xyz_esd=np.sqrt(var[:, :3]), b_esd=np.sqrt(var[:, 3]), sigma_r=np.sqrt(var[:, :3].sum(1)),
        xyz_esd_block=np.sqrt(var_block[:, :3]), b_esd_block=np.sqrt(var_block[:, 3]),
        sigma_r_block=np.sqrt(var_block[:, :3].sum(1)), cov_xyz=np.where(held, np.nan, cov)[:, :3, :3], info=info)


def atom_uncertainties(params, problem, crystal, target: str = "ml", weights: str = "posterior", coupled: bool = True,
                       cutoff: float = COLOUR_CUTOFF, seed: int = 0, active=None, progress=None,
                       method: str = "auto", curvature: str = "gauss-newton") -> Uncertainties:
    """Block-diagonal and coupled per-atom uncertainties at ``params`` (see the module docstring).

    The coupled blocks of H⁻¹ are probed colour by colour: for colour c and component k, the probe
    has random signs s_i on the atoms of c, and x = H⁻¹ v gives column k of atom i's block as s_i x_i
    (unbiased; the noise comes only from the coupling of same-colour atoms, which are ≥ ``cutoff``
    apart: probing, Tang & Saad 2012, Numer. Linear Algebra Appl. 19, 485, with random signs).
    Cost: 4 × n_colours CG solves.

    Args:
        params, problem: the refined parameters and their problem (state: mask, scales, σA).
        crystal: :class:`Crystal` (symmetry for the colouring and the floating origin).
        target: "ml" or "ls".
        weights: "posterior" (−log posterior, default) or "refinement" (the refinement's E_total).
        coupled: False for the block-diagonal estimate only.
        cutoff: colouring distance (Å); ``float("inf")`` gives every atom its own colour (exact).
        active: (n, 4) bool components to estimate (default :func:`active_components`); the others are held fixed
            and their esds are NaN ("?" in the mmCIF).
        progress: callable taking a line of text (long runs).
        method: "probe" (colours and CG, as above), "dense" (the whole matrix and its inverse) or
            "auto" (dense up to :data:`DENSE_MAX_PARAMS` active parameters, with ``coupled``).
        curvature: "gauss-newton" (default: the Gauss–Newton matrix of E_post, positive semi-definite at any
            model) or "exact" (the Hessian; indefinite away from E_post's minimum, where the CG solves fail).
    """
    if curvature not in CURVATURES:
        raise ValueError(f"uncertainty curvature {curvature!r}: expected {' or '.join(CURVATURES)}")
    t0 = time.perf_counter()
    say = progress or log.info
    prob = weighted_problem(problem, weights)
    n = params.xyz_frac.shape[0]
    comp = active_components(params, problem) if active is None else np.asarray(active, bool)
    if coupled and choose_method(method, int(comp.sum())) == "dense":
        return _dense_uncertainties(params, prob, crystal, target, weights, comp, say, t0, curvature)
    active = comp.any(1)
    xyz = np.asarray(params.xyz_frac, float) @ np.asarray(crystal.orth, float).T
    colours = np.where(active, colour_atoms(xyz, crystal, cutoff), -1)
    n_col = int(colours.max()) + 1
    basis = floating_origin(crystal)
    say(f"uncertainty: {int(active.sum())} atoms, {n_col} colours ({cutoff:g} Å), {4 * n_col} matrix-vector products "
        f"for the blocks of the {'Gauss–Newton matrix' if curvature == 'gauss-newton' else 'Hessian'}" + (f", floating origin along {len(basis)} direction(s)" if len(basis) else ""))
    blocks = hessian_blocks(params, prob, target, colours, curvature=curvature)
    m_inv, n_bad = _invert_active_blocks(blocks, comp)
    cov = m_inv.copy()
    res_max = 0.0
    if coupled:
        say(f"uncertainty: coupled estimate, {4 * n_col} preconditioned CG solves")
        pc = sparse_preconditioner(blocks, comp, params, prob, colours)
        rng = np.random.default_rng(seed)
        signs = rng.choice([-1.0, 1.0], size=n)
        probes = [(c, k) for c in range(n_col) for k in range(4)]
        est = np.zeros((n, 4, 4))
        t_solves = time.perf_counter()
        for start in range(0, len(probes), HVP_BATCH):
            chunk = probes[start:start + HVP_BATCH]
            vs = np.zeros((HVP_BATCH, n, 4))
            for j, (c, k) in enumerate(chunk):
                vs[j, colours == c, k] = signs[colours == c]
            x, res = solve(vs[: len(chunk)] * comp, params, prob, m_inv if pc is None else pc, basis, comp, target=target,
                           tol=PROBE_CG_TOL, curvature=curvature, norm="preconditioned")
            res_max = max(res_max, float(np.max(res)))
            for j, (c, k) in enumerate(chunk):
                sel = colours == c
                est[sel, :, k] = x[j, sel, :] * signs[sel, None]
            done = start + len(chunk)
            spent = time.perf_counter() - t_solves
            say(f"uncertainty: {done}/{len(probes)} solves, {spent:.0f} s" + (
                f", about {spent * (len(probes) - done) / done:.0f} s left" if done < len(probes) else ""))
        est = 0.5 * (est + est.transpose(0, 2, 1))
        idx = np.arange(4)
        # a variance of H⁻¹ is never below that of the inverse diagonal block (Schur complement): clip the noise there
        est[:, idx, idx] = np.maximum(est[:, idx, idx], m_inv[:, idx, idx])
        cov = est
    info = {"n_atoms": int(active.sum()), "b_at_floor": int((active & ~comp[:, 3]).sum()), "n_colours": n_col,
            "cutoff": cutoff, "n_hvp_blocks": 4 * n_col,
            "n_cg_solves": 4 * n_col if coupled else 0, "not_positive_definite": n_bad, "cg_residual_max": res_max,
            "floating_origin": len(basis), "weights": weights, "target": target, "method": "probe" if coupled else "blocks",
            "curvature": curvature, "seconds": time.perf_counter() - t0}
    if coupled and res_max > PROBE_RESIDUAL_WARN:
        log.warning("uncertainty: the CG solves of the coupled estimate stopped at a relative residual of %.2g (not "
                    "converged: %s); the coupled uncertainties are unreliable", res_max,
                    "the Hessian is not positive definite away from the minimum, use curvature gauss-newton"
                    if curvature == "exact" else "too few iterations")
    if n_bad:
        log.warning("uncertainty: %d atom blocks of the Hessian are not positive definite (model not at a minimum?); "
                    "their uncertainties are unreliable", n_bad)
    return _uncertainties_of(cov, m_inv, comp, info)


def _dense_uncertainties(params, prob, crystal, target, weights, comp, say, t0, curvature="exact") -> Uncertainties:
    """:func:`atom_uncertainties` by the exact Hessian (method "dense"): coupled = blocks of its pseudo-inverse,
    block-diagonal = inverses of its diagonal blocks."""
    n = params.xyz_frac.shape[0]
    basis = floating_origin(crystal)
    what = "Gauss–Newton matrix" if curvature == "gauss-newton" else "Hessian"
    say(f"uncertainty: {int(comp.any(1).sum())} atoms, the whole {what} from {4 * n} matrix-vector products"
        + (f", floating origin along {len(basis)} direction(s)" if len(basis) else ""))
    h = dense_hessian(params, prob, target, curvature=curvature)
    hinv, n_neg = dense_inverse(h, comp, basis)
    idx = np.arange(n)
    m_inv, n_bad = _invert_active_blocks(h[idx, :, idx, :], comp)
    info = {"n_atoms": int(comp.any(1).sum()), "b_at_floor": int((comp.any(1) & ~comp[:, 3]).sum()), "n_colours": n,
            "cutoff": float("inf"), "n_hvp_blocks": 4 * n, "n_cg_solves": 0, "not_positive_definite": max(n_bad, n_neg),
            "cg_residual_max": 0.0, "floating_origin": len(basis), "weights": weights, "target": target,
            "method": "dense", "curvature": curvature, "seconds": time.perf_counter() - t0}
    if info["not_positive_definite"]:
        log.warning("uncertainty: the Hessian has %d negative eigenvalues (model not at a minimum?); the uncertainties "
                    "are unreliable", info["not_positive_definite"])
    return _uncertainties_of(hinv[idx, :, idx, :], m_inv, comp, info)


def dpi(n_atoms: int, n_work: int, completeness: float, d_min: float, r_work: float, r_free: float) -> dict:
    """Cruickshank's DPI (Å, σ(r)) in the R_free and R forms (module docstring); N_params = 4 N_atoms."""
    c = completeness ** (-1.0 / 3.0)
    dof = n_work - 4 * n_atoms
    return {"dpi_free": float(np.sqrt(n_atoms / n_work) * c * d_min * r_free),
            "dpi_r": float(np.sqrt(n_atoms / dof) * c * d_min * r_work) if dof > 0 else None,
            "n_atoms": int(n_atoms), "n_obs": int(n_work), "n_params": int(4 * n_atoms),
            "completeness": float(completeness), "d_min": float(d_min), "r_work": float(r_work), "r_free": float(r_free)}


def _nanmean(a):
    a = np.asarray(a, float)
    return float(np.nanmean(a)) if np.isfinite(a).any() else None


def residue_summary(model, unc: Uncertainties, keep=None) -> list:
    """Per-residue rows: chain, seq, icode, name, n_atoms, mean and max σ_r (Å), mean σ_B (Å²)."""
    keep = np.ones(model.n_atoms, bool) if keep is None else np.asarray(keep, bool)
    rows = []
    for r in np.unique(model.res_index[keep]):
        sel = keep & (model.res_index == r)
        i = int(np.nonzero(sel)[0][0])
        rows.append({"chain": str(model.chain_id[i]), "seq": int(model.res_seq[i]), "icode": str(model.icode[i]).strip(),
                     "name": str(model.res_name[i]), "n_atoms": int(sel.sum()),
                     "sigma_r_mean": float(unc.sigma_r[sel].mean()), "sigma_r_max": float(unc.sigma_r[sel].max()),
                     "sigma_b_mean": _nanmean(unc.b_esd[sel])})
    return rows


# ------------------------------------------------------------------ sensitivities
def _mixed(v, params, problem, target, name):
    """∂/∂λ [vᵀ ∇_θ E(θ*, λ)] for λ = state.w_a ("w_a") or problem.xray.f_obs ("f_obs"); ``problem`` = (problem, state)."""

    prob, state = problem

    def with_lam(lam):
        if name == "w_a":
            return prob, state._replace(w_a=lam)
        return prob._replace(xray=prob.xray._replace(f_obs=lam)), state

    lam0 = state.w_a if name == "w_a" else prob.xray.f_obs

    def inner(lam):
        return jnp.vdot(v, jax.grad(flat_energy)(_zeros(params), params, with_lam(lam), target))

    return jax.grad(inner)(lam0)


_mixed_jit = jax.jit(_mixed, static_argnames=("target", "name"))
_grad_r_free = jax.jit(jax.grad(r_free_of))
_r_free_jit = jax.jit(r_free_of)


def _preconditioner(params, problem, crystal, target, cutoff, comp):
    """(the CG preconditioner of the implicit derivatives' solves over the ``comp`` (n, 4) components:
    :func:`sparse_preconditioner` of the exact Hessian's blocks, or their inverses; floating-origin directions)."""
    xyz = np.asarray(params.xyz_frac, float) @ np.asarray(crystal.orth, float).T
    colours = colour_atoms(xyz, crystal, cutoff)
    blocks = hessian_blocks(params, problem, target, colours)
    pc = sparse_preconditioner(blocks, comp, params, problem, colours)
    return _invert_active_blocks(blocks, comp)[0] if pc is None else pc, floating_origin(crystal)


def implicit_derivative(phi_grads, name, params, problem, crystal, target: str = "ml", cutoff: float = COLOUR_CUTOFF,
                        method: str = "auto"):
    """dφ_k/dλ for functionals with gradients ``phi_grads`` (k, n, 4) at the minimum of the refinement energy.

    Args:
        phi_grads: ∇_θ φ_k (k, n, 4) in the shift variables.
        name: "w_a" (returns (k,)) or "f_obs" (returns (k, n_refl)).
        problem: with the refinement's weights (θ* must minimise its E_total).
        method: "probe" (preconditioned CG), "dense" (the exact Hessian's pseudo-inverse) or "auto"
            (dense up to :data:`DENSE_MAX_PARAMS` active parameters).

    Returns:
        (derivatives, relative residuals (k,) of the solves).
    """
    comp = active_components(params, problem)  # B at the floor stays there: held fixed
    rhs = np.asarray(phi_grads, float) * comp
    if choose_method(method, int(comp.sum())) == "dense":
        n = params.xyz_frac.shape[0]
        basis = floating_origin(crystal)
        h = dense_hessian(params, problem, target)
        hinv, n_neg = dense_inverse(h, comp, basis)
        u = np.einsum("ajbk,rbk->raj", hinv, rhs)
        hu = np.einsum("ajbk,rbk->raj", h.reshape(n, 4, n, 4), u)
        keep = comp * 1.0
        r = (hu - rhs) * keep
        r = np.asarray(_project(jnp.asarray(r), jnp.asarray(basis))) * keep if len(basis) else r
        b = np.asarray(_project(jnp.asarray(rhs), jnp.asarray(basis))) * keep if len(basis) else rhs
        res = np.sqrt((r ** 2).sum((1, 2))) / np.maximum(np.sqrt((b ** 2).sum((1, 2))), 1e-300)
    else:
        m_inv, basis = _preconditioner(params, problem, crystal, target, cutoff, comp)
        u, res = solve(rhs, params, problem, m_inv, basis, comp, target=target)
        n_neg = 0
    if n_neg or np.max(res) > IMPLICIT_RESIDUAL_WARN:
        log.warning("implicit derivatives: %s; the parameters are not at a minimum of E_total (take them there first, "
                    "e.g. with at_minimum) and the derivatives are meaningless",
                    f"the Hessian has {n_neg} negative eigenvalues" if n_neg else
                    f"the CG solves stopped at a relative residual of {np.max(res):.2g}")
    u = jnp.asarray(u, params.xyz_frac.dtype)
    out = np.stack([-np.asarray(_mixed_jit(u[k], params, problem, target, name), float) for k in range(u.shape[0])])
    return out, np.asarray(res, float)


def _flat_energy_ml(u, params, ps):
    return flat_energy(u, params, ps, "ml")


def _flat_energy_ls(u, params, ps):
    return flat_energy(u, params, ps, "ls")


_FLAT_ENERGY = {"ml": _flat_energy_ml, "ls": _flat_energy_ls}  # module-level functions: one compiled minimiser each


def at_minimum(setup, n_steps: int = 1000, direct: bool = True, target: str = "ml"):
    """The setup's model moved to a minimum of its refinement energy, for implicit derivatives (which
    assume ∇E = 0: a model refined by another program, or by a few macrocycles, is not there).

    Mask, scales and σA stay as the setup fitted them; w_A is the engine's starting choice.

    Args:
        setup: from :func:`jaxrefine.problem.build_setup` (float64 recommended: ``refine.precision=float64``).
        n_steps: L-BFGS steps (the engine's minimiser, one compiled loop).
        direct: structure factors by direct summation (smooth to rounding; the FFT's spreading boxes make
            the energy piecewise smooth at the 1e-5 level), riding hydrogens included.

    Returns:
        (params, (problem, state), largest |∂E/∂u| left).
    """
    from ..problem.problem import pad_reflections
    from ..refine.optimize import minimise
    from ..xray.structure_factors import make_sf_setup

    problem, params = setup.problem, setup.params
    dtype = params.xyz_frac.dtype
    if direct:  # the FFT setup's form factors: one type per atom, then per riding hydrogen
        m, r = setup.model, setup.refl
        hkl = pad_reflections(r.hkl, problem.xray.hkl.shape[0])  # the problem's reflections, pads included
        problem = problem._replace(sf=make_sf_setup(m.crystal, hkl, problem.sf.ff, method="direct", d_min=r.d_min,
                                                    dtype=dtype))
    ps = (problem, setup.state._replace(w_a=jnp.asarray(starting_w_a(setup, (problem, setup.state), target), dtype)))
    u, _ = minimise(_FLAT_ENERGY[target], _zeros(params), (params, ps), n_steps)
    params = shifted_params(u, params, ps)
    g = _flat_grad(_zeros(params), params, ps, target=target)
    return params, ps, float(jnp.abs(g * jnp.asarray(active_components(params, ps), dtype)).max())


def r_free_reminimised(params, problem, w_a: float, n_steps: int = 1500, target: str = "ml") -> float:
    """R-free after minimising again from ``params`` with w_A = ``w_a`` (mask, scales, σA held): the
    brute-force counterpart of :func:`d_r_free_d_w_a` (central differences of two of these)."""
    from ..refine.optimize import minimise

    prob, state = problem
    ps = (prob, state._replace(w_a=jnp.asarray(w_a, state.w_a.dtype)))
    u, _ = minimise(_FLAT_ENERGY[target], _zeros(params), (params, ps), n_steps)
    return float(_r_free_jit(u, params, problem))


def d_r_free_d_w_a(params, problem, crystal, target: str = "ml", cutoff: float = COLOUR_CUTOFF) -> float:
    """d R-free / d w_A at the refined model (implicit differentiation; scales, σA and mask fixed)."""
    g = _grad_r_free(_zeros(params), params, problem)
    d, _ = implicit_derivative(g[None], "w_a", params, problem, crystal, target, cutoff)
    return float(d[0])


def reflection_influence(atoms, params, problem, crystal, target: str = "ml", cutoff: float = COLOUR_CUTOFF):
    """d(centroid of ``atoms``)/dF_obs(h): (3, n_refl) Å per unit of F (the data's reflections, in their order), by
    three implicit solves.

    The norm over the 3 components ranks reflections by how far a change of their amplitude moves
    the selected atoms (e.g. a side chain).
    """
    n = params.xyz_frac.shape[0]
    atoms = np.asarray(atoms)
    sel = np.zeros(n, bool)
    sel[atoms] = True
    g = np.zeros((3, n, 4))
    for c in range(3):
        g[c, sel, c] = 1.0 / sel.sum()
    from ..problem.problem import n_observed

    d, _ = implicit_derivative(g, "f_obs", params, problem, crystal, target, cutoff)
    return d[:, :n_observed(problem[0].xray)]  # the observed reflections (the pads' columns are zero)


# ------------------------------------------------------------------ the ensemble check
def sample_f_obs(f_model_abs, sigma_a, sig_f_obs, centric, epsilon, rng) -> np.ndarray:
    """Amplitudes drawn from the ML likelihood at the model (a parametric bootstrap of the data).

    Acentric: |D|Fm| + sqrt(Σ/2)(n₁ + i n₂)|, Σ = εS + 2σ²;  centric: |D|Fm| + sqrt(Σ) n|, Σ = εS + σ²
    — the amplitudes whose densities are the Rice and Woolfson distributions of
    :mod:`jaxrefine.xray.targets`.
    """
    d, s = np.asarray(sigma_a.d, float), np.asarray(sigma_a.s, float)
    eps, sig, cen = np.asarray(epsilon, float), np.asarray(sig_f_obs, float), np.asarray(centric, bool)
    mean = d * np.asarray(f_model_abs, float)
    var_a = eps * s + 2 * sig**2
    var_c = eps * s + sig**2
    n1, n2 = rng.normal(size=mean.shape), rng.normal(size=mean.shape)
    acen = np.hypot(mean + np.sqrt(var_a / 2) * n1, np.sqrt(var_a / 2) * n2)
    cent = np.abs(mean + np.sqrt(var_c) * n1)
    return np.where(cen, cent, acen)


def _with_f_obs(ps, f_obs):
    return ps[0]._replace(xray=ps[0].xray._replace(f_obs=f_obs)), ps[1]


def _ensemble_energy(u, f_obs, params, ps):
    return flat_energy(u, params, _with_f_obs(ps, f_obs), "ml")


def _ensemble_energy_ls(u, f_obs, params, ps):
    return flat_energy(u, params, _with_f_obs(ps, f_obs), "ls")


_ENSEMBLE_ENERGY = {"ml": _ensemble_energy, "ls": _ensemble_energy_ls}


def ensemble_refine(f_obs_draws, starts, params, problem, target: str = "ml", n_steps: int = 60, batch: int = 8):
    """Re-minimise from each start against each data set, batched with ``jax.vmap``.

    Args:
        f_obs_draws: (k, n_refl) amplitudes; starts: (k, n, 4) starting shifts (Å, Å²).
        problem: with the weights to minimise (use the same ``weighted_problem`` as the estimate).

    Returns:
        (k, n, 4) refined shifts.
    """
    dtype = params.xyz_frac.dtype
    out = []
    for s in range(0, len(starts), batch):
        f_obs, x0 = jax.device_put((np.asarray(f_obs_draws[s:s + batch], dtype), np.asarray(starts[s:s + batch], dtype)))
        out.append(np.asarray(_ensemble_run(f_obs, x0, n_steps, params, problem, target=target), float))
    return np.concatenate(out)


@partial(jax.jit, static_argnames="target")
def _ensemble_run(f_obs, x0, n_steps, params, problem, target):
    """One batch of :func:`ensemble_refine`.  The model and problem are arguments, not constants closed
    over: a closure put every array of the problem into the program as a literal (slower to compile,
    and compiled again for every call)."""
    from ..refine.optimize import minimise

    fun = _ENSEMBLE_ENERGY[target]
    return jax.vmap(lambda fo, x: minimise(fun, x, (fo, params, problem), n_steps)[0])(f_obs, x0)


def ensemble_spread(shifts, crystal) -> tuple:
    """Per-atom spread of an ensemble of shifts (k, n, 4): σ_r (n,) Å and σ_B (n,) Å² (floating origin removed)."""
    basis = floating_origin(crystal)
    x = np.asarray(shifts, float)
    if len(basis):
        x = np.asarray(_project(jnp.asarray(x), jnp.asarray(basis)))
    dev = x - x.mean(0)
    sigma_r = np.sqrt((dev[..., :3] ** 2).sum(-1).mean(0) * len(x) / max(len(x) - 1, 1))
    sigma_b = dev[..., 3].std(0, ddof=1)
    return sigma_r, sigma_b


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


# ------------------------------------------------------------------ driver: summary, files
def completeness(refl) -> float:
    """Fraction of the unique reflections between d_max and d_min that were measured."""
    from ..core.crystal import d_spacing
    from ..io.build import unique_hkl

    d = d_spacing(unique_hkl(refl.crystal, refl.d_min), refl.crystal)
    return float(refl.n / max(int(np.sum(d <= refl.d_max + 1e-6)), 1))


def uncertainty_summary(model, refl, params, problem, unc: Uncertainties) -> dict:
    """metrics.json content: overall figures beside Cruickshank's DPI, and one row per residue."""
    from ..problem.problem import observed
    from ..xray.stats import r_factors

    fm = np.asarray(jax.jit(_model_f)(params, problem))
    x = problem[0].xray
    r = r_factors(*observed(x, x.f_obs, fm, x.free))
    ok = np.isfinite(unc.sigma_r)
    d = dpi(int(ok.sum()), int(np.sum(np.asarray(x.work))), completeness(refl), refl.d_min, r["r_work"], r["r_free"])
    return {
        "sigma_r_rms": float(np.sqrt(np.mean(unc.sigma_r[ok] ** 2))),
        "sigma_r_median": float(np.median(unc.sigma_r[ok])),
        "sigma_r_block_rms": float(np.sqrt(np.mean(unc.sigma_r_block[ok] ** 2))),
        "sigma_b_median": float(np.nanmedian(unc.b_esd[ok])) if np.isfinite(unc.b_esd[ok]).any() else None,
        "dpi": d, "method": unc.info, "residues": residue_summary(model, unc, ok),
    }


def log_summary(summary: dict, say=None) -> None:
    say = say or log.info
    d = summary["dpi"]
    say(f"coordinate uncertainty: RMS σ_r {summary['sigma_r_rms']:.3f} Å (block-diagonal {summary['sigma_r_block_rms']:.3f} Å); "
        f"Cruickshank DPI (R-free) {d['dpi_free']:.3f} Å" + (f", DPI (R) {d['dpi_r']:.3f} Å" if d["dpi_r"] else ""))
    say("chain  res  name  atoms  mean σ_r (Å)  max σ_r (Å)  mean σ_B (Å²)")
    for row in summary["residues"]:
        say(f"{row['chain']:>5} {row['seq']:4d}{row['icode'] or ' '} {row['name']:4s} {row['n_atoms']:6d}  {row['sigma_r_mean']:12.3f}"
            f"  {row['sigma_r_max']:11.3f}  {row['sigma_b_mean'] or float('nan'):13.2f}")


def plot_residue_uncertainty(summary: dict, path, title: str = "") -> None:
    """σ_r (Å) and σ_B (Å²) per residue with the DPI as a line (PNG)."""
    from matplotlib.figure import Figure

    rows = summary["residues"]
    x = np.arange(len(rows))
    fig = Figure(figsize=(8, 4.5))
    ax, bx = fig.subplots(2, 1, sharex=True)
    ax.bar(x, [r["sigma_r_mean"] for r in rows], color="tab:blue", label="mean σ_r per residue")
    ax.plot(x, [r["sigma_r_max"] for r in rows], "k.", ms=3, label="max σ_r")
    ax.axhline(summary["dpi"]["dpi_free"], color="tab:red", ls="--", label="Cruickshank DPI (R-free)")
    ax.set_ylabel("σ_r (Å)")
    ax.legend(fontsize=7)
    bx.bar(x, [np.nan if r["sigma_b_mean"] is None else r["sigma_b_mean"] for r in rows], color="tab:green")
    bx.set_ylabel("σ_B (Å²)")
    bx.set_xlabel("residue")
    step = max(1, len(rows) // 20)
    bx.set_xticks(x[::step], [f"{r['chain']}{r['seq']}" for r in rows[::step]], rotation=90, fontsize=6)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    from ..io.writers import atomic_write

    with atomic_write(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)


def model_uncertainty(model_path, data_path, out_dir, cfg=None, coupled: bool = True, cutoff: float = COLOUR_CUTOFF,
                      weights: str = "posterior", model_out: str = "uncertainty.cif", json_out: str = "uncertainty.json",
                      progress=None, _rewrite_model: bool = False, curvature: str = "gauss-newton") -> dict:
    """Uncertainties of a model as given (no refinement): writes ``model_out`` (mmCIF with esd columns),
    ``json_out`` and ``uncertainty.png`` into ``out_dir``; returns the summary.

    The model is read as is (no placement from the configuration: a refined model is already placed);
    mask, scales and σA are fitted to it as at the end of a macrocycle.  ADPs are isotropic B on top of
    the model's ANISOU shapes (held), whatever ``refine.adp`` says: σ(B) is that of the isotropic part.
    """
    import dataclasses
    import os

    from ..config import Config
    from ..io.esd import with_file_hydrogens, write_model_with_esds
    from ..io.model import read_model
    from ..io.reflections import check_compatible, read_reflections
    from ..io.writers import protect, write_json
    from ..problem import build_setup, current_model_arrays

    cfg = cfg or Config()
    if cfg.refine.adp != "iso":  # the curvature is taken in (x, y, z, B): ANISOU / TLS ADPs are held as shapes
        cfg = dataclasses.replace(cfg, refine=dataclasses.replace(cfg.refine, adp="iso", keep_anisou=True))
    protect(data_path) if _rewrite_model else protect(model_path, data_path)
    model = read_model(model_path, hydrogens=(cfg.model.hydrogens == "keep"))
    d = cfg.data
    refl = read_reflections(data_path, labin=d.labin, free_value=d.free_value, free_fraction=d.free_fraction,
                            free_seed=d.free_seed, d_min=d.d_min, d_max=d.d_max)
    check_compatible(model.crystal, refl.crystal, os.fspath(model_path), os.fspath(data_path))
    setup = build_setup(None, None, cfg, model=model, refl=refl)
    state = setup.state
    state = state._replace(w_a=jnp.asarray(starting_w_a(setup, (setup.problem, state), cfg.refine.target), state.w_a.dtype))
    problem = (setup.problem, state)
    unc = atom_uncertainties(setup.params, problem, model.crystal, target=cfg.refine.target, weights=weights,
                             coupled=coupled, cutoff=cutoff, progress=progress, curvature=curvature)
    summary = uncertainty_summary(model, refl, setup.params, problem, unc)
    log_summary(summary, progress)
    xyz, b, occ = current_model_arrays(setup.params, setup.problem)
    os.makedirs(out_dir, exist_ok=True)
    out_model, esds, updates = model, (unc.xyz_esd, unc.b_esd), dict(xyz_cart=xyz, b_iso=b, occ=occ)
    if _rewrite_model:  # the refinement's model file: its hydrogens (output.hydrogens: write) stay in it
        full = read_model(model_path, hydrogens=True)
        if full.n_atoms > model.n_atoms:
            x_esd, b_esd, xyz, b, occ = with_file_hydrogens(full, model, unc.xyz_esd, unc.b_esd, xyz, b, occ)
            out_model, esds, updates = full, (x_esd, b_esd), dict(xyz_cart=xyz, b_iso=b, occ=occ)
    write_model_with_esds(out_model, os.path.join(out_dir, model_out), *esds, **updates)
    write_json(os.path.join(out_dir, json_out), summary)
    if cfg.output.plots:
        plot_residue_uncertainty(summary, os.path.join(out_dir, "uncertainty.png"), os.path.basename(os.fspath(model_path)))
    return summary


def add_to_refinement(out_dir, data_path, cfg=None, progress=None, coupled: bool = True) -> dict:
    """After ``jaxrefine refine`` (output.uncertainties): esd columns into ``refined.cif`` and an
    ``uncertainty`` entry in ``metrics.json`` of ``out_dir``."""
    import json
    import os

    from ..io.writers import write_json

    summary = model_uncertainty(os.path.join(out_dir, "refined.cif"), data_path, out_dir, cfg, model_out="refined.cif",
                                json_out="uncertainty.json", progress=progress, _rewrite_model=True, coupled=coupled)
    path = os.path.join(out_dir, "metrics.json")
    with open(path) as fh:
        metrics = json.load(fh)
    metrics["uncertainty"] = {k: v for k, v in summary.items() if k != "residues"}
    metrics["uncertainty"]["residues"] = summary["residues"]
    write_json(path, metrics)
    return summary
