"""Oracle for a Gauss-Newton step (issue 15): how far one step of (Fisher blocks of the X-ray term + Gauss-Newton
matrix of the restraints), solved by preconditioned CG, lowers E_total per F_calc evaluation, against L-BFGS as the
engine runs it.  Not a benchmark of time: the Fisher blocks are probed (expensive) and the CG is a Python loop.

    JAXREFINE_DATA=../shared/data python benchmarks/gn_oracle.py 5kzb [n_steps] [fisher|closed|hessian] [xyz_scale B_scale]

Results and what they mean: benchmarks/README.md, run v ("A Gauss-Newton step, tested as an oracle").
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import jax, jax.numpy as jnp, numpy as np
from jaxrefine.config import load_config
from jaxrefine.problem.setup import build_setup
from jaxrefine.refine.engine import choose_initial_w_a
from jaxrefine.refine.energy import geometry_term
from jaxrefine.refine.optimize import lbfgs_loop
from jaxrefine.validate import uncertainty as U
pid = sys.argv[1]; n_gn = int(sys.argv[2]) if len(sys.argv) > 2 else 6
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_refine as br  # noqa: E402
_, data = br.paths(pid)
extra = [a for a in os.environ.get("ORACLE_SET", "").split() if a]  # e.g. ORACLE_SET="refine.adp=iso"
cfg = load_config(None, [f"data.labin={br.LABIN[pid]}", f"model.monlib={br.DATA / 'monomers'}", *extra])
s = build_setup(br.make_shaken(pid, tempfile.mkdtemp()), data, cfg)
params0, problem, state = s.params, s.problem, s.state
w_a = choose_initial_w_a(s)
state = state._replace(w_a=jnp.asarray(w_a, state.w_a.dtype))
ps = (problem, state); ps0 = (problem, state._replace(w_a=jnp.zeros_like(state.w_a)))
n = params0.xyz_frac.shape[0]
Z = jnp.zeros((n, 4), params0.xyz_frac.dtype)
Ef = jax.jit(lambda u, p: U.flat_energy(u, p, ps))
VG = jax.jit(jax.value_and_grad(lambda u, p: U.flat_energy(u, p, ps)))
from jaxrefine.problem.params import atom_xyz
from jaxrefine.restraints.geometry import geometry_residuals
def geo_res(u, p):
    x, _ = atom_xyz(U.shifted_params(u, p, ps), problem.maps)
    return jnp.sqrt(state.w_a) * geometry_residuals(x, problem.restraints, state.nonbonded, problem.geo_weights,
                                                     problem.maps.orth, problem.maps.frac)
def _hg(v, p):
    r, jv = jax.jvp(lambda u: geo_res(u, p), (Z,), (v,))
    _, vjp = jax.vjp(lambda u: geo_res(u, p), Z)
    return 2.0 * vjp(jv)[0]
from jaxrefine.refine.energy import adp_term
def adp_flat(u, p): return problem.w_b * adp_term(U.shifted_params(u, p, ps), problem)
Ha_ = jax.jit(lambda v, p: jax.jvp(lambda u: jax.grad(adp_flat)(u, p), (Z,), (v,))[1])
Hg = jax.jit(lambda v, p: _hg(v, p) + Ha_(v, p))
rr = geo_res(Z, params0); print('check E_geo', float(jnp.sum(rr*rr)), float(state.w_a * geometry_term(params0, problem, state)))
print(pid, "atoms", n, "w_a", w_a, "E0", float(Ef(Z, params0)))
# baseline L-BFGS on u from params0
base = []
for k in (5, 10, 20, 30, 45, 60):
    run = jax.jit(lambda u0, p, k=k: lbfgs_loop(lambda u: jax.value_and_grad(lambda uu: U.flat_energy(uu, p, ps))(u), u0, k))
    u, fx, st = run(Z, params0)
    base.append((int(st.evaluations), float(fx)))
print("LBFGS (evals, E):", [(a, round(b, 1)) for a, b in base])
# Fisher (expected information) of the ML target, complex-Gaussian limit: 2 D^2/(eps S) |dFm|^2 (acentric)
from jaxrefine.problem.xray_state import f_model_of
MODE = sys.argv[3] if len(sys.argv) > 3 else 'fisher'
CLOSED_SCALE = tuple(float(v) for v in sys.argv[4:6]) if len(sys.argv) > 5 else (1.0, 1.0)  # closed-form blocks x these
X = problem.xray
wgt = jnp.where(X.work, jnp.where(X.centric, 1.0, 2.0) * state.sigma_a.d**2 / (X.epsilon * state.sigma_a.s), 0.0)
def fr(u, p):
    f = f_model_of(U.shifted_params(u, p, ps), problem, state)
    return jnp.stack([f.real, f.imag])
EPS = 1e-2
@jax.jit
def fvp(v, p):
    jv = (fr(EPS * v, p) - fr(-EPS * v, p)) / (2 * EPS)
    _, vjp = jax.vjp(lambda u: fr(u, p), Z)
    return vjp(wgt[None] * jv)[0]
def fisher_blocks(p):
    b = np.zeros((n, 4, 4))
    for c in range(cols.max() + 1):
        for k in range(4):
            v = np.zeros((n, 4)); v[cols == c, k] = 1.0
            hv = np.asarray(fvp(jnp.asarray(v, Z.dtype), p), float)
            b[cols == c, :, k] = hv[cols == c]
    b = 0.5 * (b + b.transpose(0, 2, 1))
    # ADP restraints (w_B) and nothing else: add a small ridge on B
    return b + np.eye(4)[None] * 1e-6 * np.maximum(np.trace(b, axis1=1, axis2=2), 1e-9)[:, None, None]
def closed_blocks(p):
    """Per-atom diagonal Fisher blocks in closed form (servalcat's kind: a function of the atom's type, B and
    occupancy and of the reflections' weights, no probing): x, y, z: n_ops q² (4π²/3) Σ_h W f² e^(−B s²/2) s²;
    B: n_ops q² Σ_h W f² e^(−B s²/2) (s²/4)²; W = ML weight × k_total²; riding H added to their parent."""
    from jaxrefine.problem.xray_state import current_model_arrays
    from jaxrefine.xray.formfactors import f0
    from jaxrefine.xray.scaling import k_total
    _, b, q = current_model_arrays(p, problem)
    s2 = np.asarray(X.s2, float)
    w = np.asarray(wgt, float) * np.asarray(k_total(state.scales, X.s_cart), float) ** 2
    ff = problem.sf.ff
    f = np.asarray(f0(ff, X.s2), float)  # (n_refl, n_types)
    types = np.asarray(ff.type_index)
    n_ops = problem.sf.rot.shape[0]
    owner = np.arange(n)
    bb, qq = b, q
    if problem.riding is not None:
        par = np.asarray(problem.riding.parent)
        owner = np.concatenate([owner, par]); bb = np.concatenate([b, b[par]]); qq = np.concatenate([q, q[par]])
    sx, sb = np.zeros(len(bb)), np.zeros(len(bb))
    for i in range(0, len(bb), 1000):  # (atoms, reflections) in chunks: 4iid is 27k x 94k
        e = np.exp(-0.5 * np.outer(bb[i:i + 1000], s2)) * f[:, types[i:i + 1000]].T ** 2
        sx[i:i + 1000], sb[i:i + 1000] = e @ (w * s2), e @ (w * (s2 / 4) ** 2)
    fx = n_ops * qq**2 * (4 * np.pi**2 / 3) * sx
    fb = n_ops * qq**2 * sb
    fx, fb = fx * CLOSED_SCALE[0], fb * CLOSED_SCALE[1]
    out = np.zeros((n, 4, 4))
    np.add.at(out, (owner, 0, 0), fx); np.add.at(out, (owner, 1, 1), fx); np.add.at(out, (owner, 2, 2), fx)
    np.add.at(out, (owner, 3, 3), fb)
    return out
# GN oracle
cols = U.colour_atoms(np.asarray(s.model.xyz_cart), s.model.crystal)
print("colours", cols.max() + 1)
p = params0; evals = 0; hist = []
gamma = 0.0
for it in range(n_gn):
    t0 = time.perf_counter()
    e0, g = VG(Z, p); evals += 1
    if MODE == 'hessian':
        bx = U.hessian_blocks(p, ps0, colours=cols)          # X-ray (+ADP) blocks, oracle
        w_, v_ = np.linalg.eigh(bx); top = np.maximum(w_.max(-1, keepdims=True), 1e-12); nneg = int((w_ <= 0).any(-1).sum())
        bx = np.einsum('nij,nj,nkj->nik', v_, np.maximum(w_, 1e-3 * top), v_)
    elif MODE == 'closed':
        bx = closed_blocks(p); nneg = 0
        if it == 0:
            pb = fisher_blocks(p)
            for k in (0, 3):
                r_ = np.diagonal(bx, axis1=1, axis2=2)[:, k] / np.maximum(np.diagonal(pb, axis1=1, axis2=2)[:, k], 1e-12)
                print(f"  closed/probed diagonal {'xyz' if k == 0 else 'B'}: median {np.median(r_):.3f}, 10-90 % {np.percentile(r_, 10):.3f}-{np.percentile(r_, 90):.3f}")
    else:
        bx = fisher_blocks(p); nneg = 0
    # geometry blocks (for the preconditioner): colouring HVPs of geo
    bg = np.zeros((n, 4, 4))
    for c in range(cols.max() + 1):
        for k in range(3):
            v = np.zeros((n, 4)); v[cols == c, k] = 1.0
            hv = np.asarray(Hg(jnp.asarray(v, Z.dtype), p))
            bg[cols == c, :, k] = hv[cols == c]
    M = np.linalg.inv(bx + bg + 1e-6 * np.eye(4)[None] * np.maximum(np.trace(bx, axis1=1, axis2=2)[:, None, None] / 4, 1e-9))
    bx_j = jnp.asarray(bx, Z.dtype)
    A = lambda v: np.asarray(jnp.einsum('nij,nj->ni', bx_j, jnp.asarray(v, Z.dtype)) + Hg(jnp.asarray(v, Z.dtype), p), float)
    t1 = time.perf_counter()
    # PCG
    b = -np.asarray(g, float); x = np.zeros_like(b); r = b.copy(); z = np.einsum('nij,nj->ni', M, r); d = z.copy(); rz = np.sum(r * z)
    n_cg = 0
    for n_cg in range(1, 61):
        Ad = A(d); dAd = np.sum(d * Ad)
        if dAd <= 0: print("  negative curvature at cg", n_cg); break
        a = rz / dAd; x += a * d; r -= a * Ad
        if np.linalg.norm(r) < 1e-2 * np.linalg.norm(b): break
        z = np.einsum('nij,nj->ni', M, r); rz_new = np.sum(r * z); d = z + rz_new / rz * d; rz = rz_new
    t2 = time.perf_counter()
    # line search
    print('   g.d', float(np.sum(np.asarray(g, float) * x)), 'rms B shift', float(np.sqrt(np.mean(x[:, 3]**2))), 'max xyz', float(np.abs(x[:, :3]).max()), 'cg resid', float(np.linalg.norm(r)/np.linalg.norm(b)))
    for alpha in (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03, 0.01, 0.0):
        if alpha == 0.0: e1 = float(e0); break
        e1 = float(Ef(jnp.asarray(alpha * x, Z.dtype), p)); evals += 1
        if e1 < float(e0): break
    p = U.shifted_params(jnp.asarray(alpha * x, Z.dtype), p, ps)
    hist.append((evals, round(e1, 1), alpha, n_cg))
    print(f"  neg blocks {nneg}"); print(f"  GN {it}: E {float(e0):.1f} -> {e1:.1f} alpha {alpha} cg {n_cg} | evals {evals} | blocks {t1-t0:.1f}s cg {t2-t1:.2f}s  rms shift {np.sqrt(np.mean(np.sum((alpha*x[:, :3])**2, 1))):.3f} A", flush=True)
