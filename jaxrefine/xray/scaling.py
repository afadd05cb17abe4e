"""Overall, anisotropic and bulk-solvent scaling of F_model to F_obs.

F_model(h) = k_total(h) · (F_calc + k_sol exp(−B_sol s²/4) F_mask),
k_total(h) = k_overall · exp(−¼ sᵀ B_cart s),   s = reciprocal-lattice vector in Cartesian Å⁻¹

(Afonine et al. 2013, Acta Cryst. D69, 625, eqs. 1–3; Grosse-Kunstleve & Adams 2002,
J. Appl. Cryst. 35, 477 for the symmetry constraints on B_cart). B_cart here holds the isotropic
part too (B_iso = trace/3); B11 B22 B33 B12 B13 B23 in Å².

Fitting (outside jit, numpy float64; the grid search of large data sets one compiled program): a grid
search over (k_sol, B_sol) with k_overall and B_cart from a log-linear least-squares fit at each point,
then Levenberg–Marquardt on Σ_work (|F_obs| − |F_model|)² over all parameters together, alternating with
a resolution-dependent isotropic scale k_iso(s²) (piecewise linear in s², linear least squares; the
binned k_isotropic of Afonine et al. 2013) that absorbs what the smooth model misses.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..core.device import array_module
from .solvent import bulk_solvent_factor

K_SOL_GRID = np.arange(0.0, 0.61, 0.05)  # e/Å³ relative to the mask; typical 0.3–0.45 (Fokine & Urzhumtsev 2002)
B_SOL_GRID = np.arange(10.0, 131.0, 10.0)  # Å²; typical 30–80
K_ISO_PER_NODE = 500  # work reflections per node of the resolution-dependent scale
K_ISO_MAX_NODES = 20
B_SOL_BOUNDS = (10.0, 300.0)  # as servalcat; B_sol and the overall B are strongly correlated at low resolution
K_SOL_BOUNDS = (0.0, 1.5)
K_ISO_RANGE = (0.05, 20.0)  # the resolution-dependent scale is clipped here (a node fitted on few, weak reflections)
# Levenberg–Marquardt of the joint scale fit (Marquardt 1963): damping λ·diag(JᵀJ), ×10 on a rejected
# step and ÷10 on an accepted one; stop when an accepted step gains less than LM_REL_TOL of the cost.
# The residuals are numpy float64 on the host (until session 34 they were float32 programs, and LM_REL_TOL was
# set above what float32 resolves, ~1e-7 relative: at 1e-9 with a float32 sum every fit ran its 30 steps on rounding
# noise, 4iid: 64 cost evaluations per LM, 0.37 s of a 0.70 s scale fit); the tolerance was kept.
LM_LAMBDA_START = 1e-3
LM_LAMBDA_MIN = 1e-9
LM_MAX_ITER = 30  # accepted steps
LM_MAX_TRIES = 10  # damping increases per step before giving up
LM_REL_TOL = 1e-6


class Scales(NamedTuple):
    """Scale parameters of F_model (a pytree of JAX arrays).

    Attributes:
        k_overall: () overall scale.
        b_aniso: (6,) Cartesian B tensor B11 B22 B33 B12 B13 B23 (Å²), isotropic part included.
        k_sol: () bulk-solvent scale.
        b_sol: () bulk-solvent B (Å²).
        k_iso_s2: (n_nodes,) s² (Å⁻²) of the nodes of the resolution-dependent isotropic scale, or None.
        k_iso: (n_nodes,) its values; k_total is multiplied by their linear interpolation in s²
            (constant beyond the end nodes), the binned k_isotropic of Afonine et al. 2013. None: 1.
    """

    k_overall: jax.Array
    b_aniso: jax.Array
    k_sol: jax.Array
    b_sol: jax.Array
    k_iso_s2: jax.Array | None = None
    k_iso: jax.Array | None = None


def reciprocal_vectors(hkl, crystal) -> np.ndarray:
    """(n, 3) Cartesian reciprocal vectors s = frac^T h (Å⁻¹), |s|² = 1/d²."""
    return np.asarray(hkl, float) @ np.asarray(crystal.frac)


def _sym_to_mat(b):
    b11, b22, b33, b12, b13, b23 = b
    return np.array([[b11, b12, b13], [b12, b22, b23], [b13, b23, b33]])


def _mat_to_sym(m):
    return np.array([m[0, 0], m[1, 1], m[2, 2], m[0, 1], m[0, 2], m[1, 2]])


def aniso_basis(crystal) -> np.ndarray:
    """Basis of Cartesian B tensors allowed by the point group, (n_par, 6).

    A tensor is allowed when R_c B R_cᵀ = B for every operator, R_c = orth · R · frac
    (Grosse-Kunstleve & Adams 2002). The basis spans the null space of the stacked linear maps
    B ↦ R_c B R_cᵀ − B; it is orthonormal in the 6-vector space.
    """
    orth, frac = np.asarray(crystal.orth), np.asarray(crystal.frac)
    rows = []
    for r in np.asarray(crystal.rot):
        rc = orth @ r @ frac
        m = np.zeros((6, 6))
        for j in range(6):
            e = np.zeros(6)
            e[j] = 1.0
            m[:, j] = _mat_to_sym(rc @ _sym_to_mat(e) @ rc.T) - e
        rows.append(m)
    a = np.vstack(rows)
    _, sv, vt = np.linalg.svd(a)
    null = vt[np.sum(sv > 1e-6 * max(sv.max(), 1.0)):]
    return null


def aniso_quadratic(s_cart):
    """(n, 6) products such that sᵀ B s = q · (B11 B22 B33 B12 B13 B23) (numpy for numpy input: host code
    compiles no programs for it)."""
    xp = array_module(s_cart)
    x, y, z = s_cart[:, 0], s_cart[:, 1], s_cart[:, 2]
    return xp.stack([x * x, y * y, z * z, 2 * x * y, 2 * x * z, 2 * y * z], axis=1)


def k_total(scales: Scales, s_cart):
    """k_overall · k_iso(s²) · exp(−¼ sᵀ B_cart s) per reflection; s_cart (n, 3) Å⁻¹ -> (n,) (numpy for numpy
    arguments, :func:`jaxrefine.core.device.array_module`)."""
    xp = array_module(scales, s_cart)
    k = scales.k_overall * xp.exp(-0.25 * aniso_quadratic(s_cart) @ scales.b_aniso)
    if scales.k_iso is not None:
        s2 = xp.sum(xp.asarray(s_cart) ** 2, axis=1)
        k = k * xp.interp(s2, scales.k_iso_s2, scales.k_iso)
    return k


def _hat_pieces(s2, nodes):
    """((n,) j, (n,) t): each s² lies between nodes j and j + 1 at the fraction t (clipped to the end nodes;
    one node: j = 0, t = 0).  The linear-interpolation weights are 1 − t on node j and t on node j + 1."""
    if len(nodes) == 1:
        return np.zeros(len(s2), np.int64), np.zeros(len(s2))
    s2 = np.clip(s2, nodes[0], nodes[-1])
    j = np.clip(np.searchsorted(nodes, s2, side="right") - 1, 0, len(nodes) - 2)
    return j, (s2 - nodes[j]) / (nodes[j + 1] - nodes[j])


def _hat_interpolate(s2, nodes, vals):
    """(n,) the piecewise-linear function of s² with ``vals`` at ``nodes`` (constant outside them)."""
    j, t = _hat_pieces(s2, nodes)
    return vals[j] * (1 - t) + vals[np.minimum(j + 1, len(nodes) - 1)] * t


def k_iso_node_count(n_work: int, n_per_node: int = K_ISO_PER_NODE, max_nodes: int = K_ISO_MAX_NODES) -> int:
    """Nodes of k_iso(s²) fitted from ``n_work`` work reflections (:func:`fit_k_iso`)."""
    return int(np.clip(n_work // n_per_node, 1, max_nodes))


def fit_k_iso(f_obs, f_amp, s2, n_per_node: int = K_ISO_PER_NODE, max_nodes: int = K_ISO_MAX_NODES):
    """Nodes and values of the resolution-dependent isotropic scale (linear least squares).

    Minimises Σ (Fo − k_iso(s²)|F|)² with k_iso linear in s² between nodes placed at the mean s²
    of equal-count bins of ``n_per_node`` reflections (Afonine et al. 2013, k_isotropic).

    Args:
        f_obs: (n,) amplitudes; f_amp: (n,) |F_model| before k_iso; s2: (n,) 1/d² — all of the work set.

    Returns:
        (nodes (m,) s², values (m,)).
    """
    order = np.argsort(s2)
    n_nodes = k_iso_node_count(len(s2), n_per_node, max_nodes)
    groups = np.array_split(order, n_nodes)
    nodes = np.array([s2[g].mean() for g in groups])
    # the normal equations of the (n, m) design with two non-zeros per row, (1 − t)|F| and t|F| on nodes j, j + 1,
    # summed per node (a dense design and its lstsq: 59 ms per call on 94k reflections, this 8 ms)
    j, t = _hat_pieces(s2, nodes)
    m = len(nodes)
    u, v = (1 - t) * f_amp, t * f_amp
    k = np.minimum(j + 1, m - 1)  # = j + 1 with two or more nodes; with one, t = 0 and v = 0
    ata = np.diag(np.bincount(j, u * u, m) + np.bincount(k, v * v, m))
    off = np.bincount(j, u * v, m)[: m - 1]  # (j, j + 1) and its mirror: the design is tridiagonal in normal form
    ata[np.arange(m - 1), np.arange(1, m)] += off
    ata[np.arange(1, m), np.arange(m - 1)] += off
    atb = np.bincount(j, u * f_obs, m) + np.bincount(k, v * f_obs, m)
    vals, *_ = np.linalg.lstsq(ata, atb, rcond=None)
    return nodes, np.clip(vals, *K_ISO_RANGE)


def _loglinear_design(q, basis):
    """Design matrix of ln F_obs − ln |F| = ln k − ¼ q·(basisᵀ p): columns ln k, p."""
    return np.hstack([np.ones((q.shape[0], 1)), -0.25 * q @ basis.T])


class _ScaleFitData(NamedTuple):
    """The work set of a joint scale fit (numpy, float64): F_obs, F_calc, F_mask, s², the (n, m) anisotropy
    design q · basisᵀ and the k_iso(s²) multiplier of the round."""
    fo: np.ndarray
    fc: np.ndarray
    fm: np.ndarray
    s2: np.ndarray
    qb: np.ndarray
    mult: np.ndarray


def _amp_pieces(x, d: _ScaleFitData):
    """(|F_model| / k_iso, k exp(−¼ qb·p), F_calc + bulk, |F_calc + bulk|, exp(−B_sol s²/4)) at
    x = [k, p, k_sol, B_sol]."""
    k, p, k_sol, b_sol = x[0], x[1:-2], x[-2], x[-1]
    e_sol = bulk_solvent_factor(1.0, b_sol, d.s2)
    f = d.fc + (k_sol * e_sol) * d.fm
    f_abs = np.sqrt(f.real**2 + f.imag**2 + 1e-30)
    k_aniso = k * np.exp(-0.25 * (d.qb @ p))
    return k_aniso * f_abs, k_aniso, f, f_abs, e_sol


def _lm_residuals(x, d: _ScaleFitData):
    """(n,) F_obs − k_iso |F_model| of the work set (numpy float64: on the host no program is compiled or loaded;
    jitted, the residuals and their Jacobian were three small programs, ~70 ms of a warm run to trace and load)."""
    return d.fo - d.mult * _amp_pieces(x, d)[0]


def _lm_pieces(x, d: _ScaleFitData):
    """(residuals (n,), Jacobian (n, m + 3)) of :func:`_lm_residuals` at x, the Jacobian analytic: with
    F = F_calc + k_sol e F_mask, e = exp(−B_sol s²/4), ∂|F|/∂θ = Re(F* ∂F/∂θ) / |F|."""
    amp, k_aniso, f, f_abs, e_sol = _amp_pieces(x, d)
    k_sol = x[-2]
    d_abs_d_ksol = (f.conj() * (e_sol * d.fm)).real / f_abs
    d_amp = np.empty((len(amp), len(x)))
    d_amp[:, 0] = amp / x[0]
    d_amp[:, 1:-2] = -0.25 * amp[:, None] * d.qb
    d_amp[:, -2] = k_aniso * d_abs_d_ksol
    d_amp[:, -1] = k_aniso * d_abs_d_ksol * (-k_sol * d.s2 / 4.0)
    return d.fo - d.mult * amp, -d.mult[:, None] * d_amp


def _lm_cost(x, d: _ScaleFitData):
    """Σ (F_obs − k_iso |F_model|)² over the work set."""
    r = _lm_residuals(x, d)
    return float(r @ r)


def _levenberg_marquardt(x, data: _ScaleFitData, n_iter=LM_MAX_ITER, fix_solvent=False):
    lam = LM_LAMBDA_START
    cost = _lm_cost(x, data)
    for _ in range(n_iter):
        r, jac = _lm_pieces(x, data)
        if fix_solvent:
            jac[:, -2:] = 0.0
        jtj = jac.T @ jac
        g = jac.T @ r
        improved = False
        for _ in range(LM_MAX_TRIES):
            a = jtj + lam * np.diag(np.diag(jtj) + 1e-12)
            step = -np.linalg.lstsq(a, g, rcond=None)[0]
            x_new = x + step
            x_new[-2] = np.clip(x_new[-2], *K_SOL_BOUNDS)
            x_new[-1] = np.clip(x_new[-1], *B_SOL_BOUNDS)
            x_new[0] = max(x_new[0], 1e-6 * abs(x[0]) + 1e-12)
            c_new = _lm_cost(x_new, data)
            if c_new < cost:
                improved = True
                rel = (cost - c_new) / max(cost, 1e-300)
                x, cost, lam = x_new, c_new, max(lam / 10, LM_LAMBDA_MIN)
                break
            lam *= 10
        if not improved or rel < LM_REL_TOL:
            break
    return x, cost


@jax.jit
def _grid_r(fo, fc2, cross, fm2, s2w, design, pinv, k_sol_grid, b_sol_grid):
    """(n_b, n_k) R of every (B_sol, k_sol) grid point after its log-linear fit (see :func:`_solvent_grid_search`;
    the picked points' fits are redone in float64 by :func:`_grid_point`).  One program for the whole grid:
    the numpy loop over 169 points took 0.22 s on 4iid's 94k work reflections, every macrocycle."""
    log_fo, sum_fo = jnp.log(fo), jnp.sum(fo)

    def per_b(b_sol):
        a = k_sol_grid[:, None] * jnp.exp(-b_sol * s2w / 4)[None]  # (k, n)
        log_f = 0.5 * jnp.log(jnp.maximum(fc2 + a * cross + a * a * fm2, 1e-30))  # ln|F|: one log, no sqrt
        p = (log_fo[None] - log_f) @ pinv.T  # (k, m)
        calc = jnp.exp(p @ design.T + log_f)
        kk = jnp.sum(fo * calc, axis=1) / jnp.maximum(jnp.sum(calc * calc, axis=1), 1e-30)
        return jnp.sum(jnp.abs(fo - kk[:, None] * calc), axis=1) / sum_fo

    return jax.lax.map(per_b, b_sol_grid)


def _grid_point(fo, fc2, cross, fm2, s2w, design, pinv, k_sol, b_sol, log_fo=None):
    """(R, p, LS scale) of one grid point in numpy float64 (the log-linear fit of :func:`_grid_r`)."""
    a = k_sol * np.exp(-b_sol * s2w / 4)
    f_abs = np.sqrt(np.maximum(fc2 + a * cross + a * a * fm2, 1e-30))
    p = pinv @ ((np.log(fo) if log_fo is None else log_fo) - np.log(f_abs))
    calc = np.exp(design @ p) * f_abs
    kk = np.sum(fo * calc) / max(np.sum(calc * calc), 1e-300)  # LS scale on top of the log fit
    return np.sum(np.abs(fo - kk * calc)) / np.sum(fo), p, kk


GRID_RECHECK = 4  # best grid points of the compiled search re-scored in float64 (the pick is float64's)
# work reflections from which the compiled search is used: below, numpy's loop takes less than the compiled
# program's first compile (0.16 s; 4iid's 94k reflections: loop 0.22 s, compiled 0.10 s with the recheck)
GRID_COMPILED_MIN = 20000


def _solvent_grid_search(fo, fc, fm, qw, s2w, basis, k_sol_grid, b_sol_grid, compiled: bool | None = None):
    """Start of the scale fit: for each (k_sol, B_sol) of the grid, k_overall and B_cart by a
    log-linear least-squares fit; returns x = [k, p (anisotropy parameters), k_sol, B_sol] of the
    grid point with the lowest R (work reflections only).

    The grid is scored by one compiled program (float32 where the refinement is); its GRID_RECHECK best points
    are scored again in float64 and the best of those is taken, so the pick is the float64 search's (ties
    between basins decide where the fit ends: 5orl's k_sol 0.37 or 0.45).  ``compiled``: None: from
    GRID_COMPILED_MIN work reflections; False: every point in float64 with numpy."""
    # |Fc + a Fm|² = |Fc|² + 2a Re(Fc Fm*) + a²|Fm|², a = k_sol exp(−B_sol s²/4); the log-linear
    # design matrix does not depend on (k_sol, B_sol), so its pseudo-inverse is computed once.
    fc2, cross, fm2 = np.abs(fc) ** 2, 2 * (fc * np.conj(fm)).real, np.abs(fm) ** 2
    design = _loglinear_design(qw, basis)
    pinv = np.linalg.pinv(design)
    k_grid, b_grid = np.asarray(k_sol_grid, float), np.asarray(b_sol_grid, float)
    points = np.arange(len(k_grid) * len(b_grid))  # b-major, k-minor
    if compiled or (compiled is None and len(fo) >= GRID_COMPILED_MIN):
        r = _grid_r(*(jax.device_put(v) for v in (fo, fc2, cross, fm2, s2w, design, pinv, k_grid, b_grid)))
        points = np.argsort(np.asarray(r, float).reshape(-1), kind="stable")[:GRID_RECHECK]
    best, log_fo = None, np.log(fo)
    for i in sorted(points):  # grid order: ties keep the first point
        b_sol, k_sol = b_grid[i // len(k_grid)], k_grid[i % len(k_grid)]
        r64, p, kk = _grid_point(fo, fc2, cross, fm2, s2w, design, pinv, k_sol, b_sol, log_fo)
        if best is None or r64 < best[0]:
            best = (r64, np.exp(p[0]) * kk, basis.T @ p[1:], k_sol, b_sol)
    _, k, b6, k_sol, b_sol = best
    return np.concatenate([[k], basis @ b6, [k_sol, b_sol]])


def _joint_refinement(x, fo, fc, fm, qw, s2w, basis, refine, use_solvent, resolution_scale, n_macro):
    """Rounds of (Levenberg–Marquardt of all scale parameters, resolution-dependent k_iso fit) from
    the grid-search start ``x``, in numpy float64.  Returns (x, k_iso nodes or None, k_iso values or None)."""
    data = _ScaleFitData(np.asarray(fo, float), np.asarray(fc, complex), np.asarray(fm, complex),
                         np.asarray(s2w, float), np.asarray(qw, float) @ np.asarray(basis, float).T, np.ones(len(fo)))
    nodes = vals = None
    for _ in range(n_macro if resolution_scale else 1):
        if refine:
            x, _ = _levenberg_marquardt(np.asarray(x, float), data, fix_solvent=not use_solvent)
        if resolution_scale:
            nodes, vals = fit_k_iso(fo, _amp_pieces(x, data)[0], s2w)
            data = data._replace(mult=_hat_interpolate(s2w, nodes, vals))
    return x, nodes, vals


def fit_scales(
    f_obs,
    f_calc,
    f_mask,
    s_cart,
    work,
    crystal,
    k_sol_grid=K_SOL_GRID,
    b_sol_grid=B_SOL_GRID,
    refine: bool = True,
    use_solvent: bool = True,
    resolution_scale: bool = True,
    n_macro: int = 2,
) -> Scales:
    """Fit k_overall, the symmetry-constrained B_cart, k_sol and B_sol on the work set.

    Args:
        f_obs: (n,) observed amplitudes.
        f_calc: (n,) complex atomic-model structure factors.
        f_mask: (n,) complex mask structure factors (see :func:`jaxrefine.xray.structure_factors.f_from_grid`);
            None for no bulk solvent.
        s_cart: (n, 3) Cartesian reciprocal vectors (Å⁻¹), :func:`reciprocal_vectors`.
        work: (n,) bool, reflections used for the fit (the work set).
        crystal: :class:`jaxrefine.core.crystal.Crystal` (for the anisotropy constraints).
        k_sol_grid, b_sol_grid: grid searched before the joint refinement.
        refine: run the joint least-squares refinement after the grid search.
        use_solvent: False fits k_overall and B_cart only (k_sol = 0).
        resolution_scale: also fit the resolution-dependent isotropic scale k_iso(s²)
            (:func:`fit_k_iso`), alternating with the joint refinement ``n_macro`` times.
        n_macro: rounds of (joint refinement, k_iso fit).

    Returns:
        :class:`Scales` minimising Σ_work (F_obs − |F_model|)² (Afonine et al. 2013).
    """
    f_obs = np.asarray(f_obs, float)
    f_calc = np.asarray(f_calc, complex)
    s_cart = np.asarray(s_cart, float)
    work = np.asarray(work, bool) & (f_obs > 0)
    if f_mask is None or not use_solvent:
        f_mask = np.zeros_like(f_calc)
        k_sol_grid, b_sol_grid = np.array([0.0]), np.array([0.0])
    f_mask = np.asarray(f_mask, complex)
    s2 = np.sum(s_cart**2, axis=1)
    q = np.asarray(aniso_quadratic(s_cart))
    basis = aniso_basis(crystal)
    fo, fc, fm, qw, s2w = f_obs[work], f_calc[work], f_mask[work], q[work], s2[work]
    x = _solvent_grid_search(fo, fc, fm, qw, s2w, basis, k_sol_grid, b_sol_grid)
    x, nodes, vals = _joint_refinement(x, fo, fc, fm, qw, s2w, basis, refine, use_solvent, resolution_scale, n_macro)
    b_cart = basis.T @ x[1:-2]
    return Scales(
        k_overall=jax.device_put(x[0]),
        b_aniso=jax.device_put(b_cart),
        k_sol=jax.device_put(x[-2] if use_solvent else 0.0),
        b_sol=jax.device_put(x[-1] if use_solvent else 0.0),
        k_iso_s2=None if nodes is None else jax.device_put(nodes),
        k_iso=None if vals is None else jax.device_put(vals),
    )
