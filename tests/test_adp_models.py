"""Anisotropic ADPs, TLS and local NCS: parametrisations, restraints, file round trips.

References: closed forms (a pure libration about an axis, a T-only group), gemmi's own
``calculate_u_from_tls`` on the deposited TLS groups of 1va7, float64 central differences for
every gradient, rigid-motion invariance of the NCS energy.  Anisotropic F_calc against gemmi on
4xof (ANISOU) is tested in tests/test_structure_factors.py (test against gemmi's
StructureFactorCalculatorX with split_adp), so it is not repeated here.
"""
from __future__ import annotations

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrefine.io.model import model_from_structure, read_model
from jaxrefine.io.ncs import find_ncs_copies
from jaxrefine.io.tls import read_tls_groups, set_tls_groups, tls_groups_from_spec, tls_pdb_remarks
from jaxrefine.problem.params import rotation_matrix
from jaxrefine.restraints.adp_aniso import (
    aniso_adp_energy,
    aniso_adp_report,
    aniso_adp_term,
    isotropy_energy,
    rigid_bond_deltas,
    rigid_bond_energy,
    similarity_energy,
)
from jaxrefine.restraints.ncs import NCS_PAIRS_PER_ATOM, NCS_RADIUS, geman_mcclure, local_pairs, ncs_deltas, ncs_energy, ncs_report, ncs_term
from jaxrefine.xray.adp import (
    EIGHT_PI2,
    b_eq,
    cholesky_params,
    tls_cholesky_params,
    tls_from_cholesky,
    u_from_cholesky,
    u_from_tls,
    u_iso6,
)

from conftest import dataset_paths

# ---- tolerances (one place, with the reason) ----
TOL_EXACT = 1e-12  # closed forms and round trips evaluated in float64
TOL_FD = 1e-6  # relative: float64 autodiff vs central differences with h = 1e-6 (error ~h²)
TOL_GEMMI_TLS = 1e-9  # same formula as gemmi's calculate_u_from_tls, in double precision
TOL_RIGID_COPY = 1e-18  # Σ z² with z ~ 1e-13 (float64 rounding of ~10 Å distances over σ = 0.1 Å)
TOL_FILE = 1e-3  # Å²: TLS and ANISOU go through the files' fixed decimals (4 in mmCIF)
# Å²: PDB REMARK 3 holds T, L, S to 4 decimals; a refined 6×6 TLS matrix with an eigenvalue near 0
# (common) comes back slightly indefinite, and making it positive again moves U by up to ~2e-3 Å²
# (0.2 Å² in B) for atoms 20 Å from the origin
TOL_FILE_PDB_TLS = 4e-3


def central_difference_check(fn, x, n_probe=6, h=1e-6, seed=0):
    """Compare jax.grad(fn) with central differences along random coordinates of x (float64)."""
    x = jnp.asarray(x, jnp.float64)
    g = np.asarray(jax.jit(jax.grad(fn))(x)).ravel()
    fn = jax.jit(fn)  # one compile instead of op-by-op dispatch for each probe
    rng = np.random.default_rng(seed)
    flat = np.asarray(x).ravel()
    for k in rng.choice(flat.size, size=min(n_probe, flat.size), replace=False):
        e = np.zeros_like(flat)
        e[k] = h
        fd = (float(fn(jnp.asarray((flat + e).reshape(x.shape)))) - float(fn(jnp.asarray((flat - e).reshape(x.shape))))) / (2 * h)
        assert abs(g[k] - fd) <= TOL_FD * max(1.0, abs(fd)), (k, g[k], fd)


def random_u(n, seed=1):
    """(n, 6) positive-definite U (Å²) with anisotropy typical of protein atoms (0.05–0.4 Å²)."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(n, 3, 3)))[0]
    w = rng.uniform(0.05, 0.4, size=(n, 3))
    m = np.einsum("nij,nj,nkj->nik", q, w, q)
    return np.stack([m[:, 0, 0], m[:, 1, 1], m[:, 2, 2], m[:, 0, 1], m[:, 0, 2], m[:, 1, 2]], -1)


def u_matrix(u6):
    u11, u22, u33, u12, u13, u23 = np.asarray(u6).T
    return np.stack([np.stack([u11, u12, u13], -1), np.stack([u12, u22, u23], -1), np.stack([u13, u23, u33], -1)], -2)


# ----------------------------------------------------------------- Cholesky parametrisation
def test_cholesky_round_trip_and_positive_definite():
    u = random_u(50)
    u_min = 0.02
    raw = cholesky_params(u)
    np.testing.assert_allclose(np.asarray(u_from_cholesky(jnp.asarray(raw))), u, atol=TOL_EXACT)
    raw = cholesky_params(u, u_min=u_min)
    np.testing.assert_allclose(np.asarray(u_from_cholesky(jnp.asarray(raw), u_min)), u, atol=TOL_EXACT)
    # any parameter vector gives a positive-definite U with eigenvalues ≥ u_min
    wild = np.random.default_rng(3).normal(scale=5.0, size=(200, 6))
    eig = np.linalg.eigvalsh(u_matrix(np.asarray(u_from_cholesky(jnp.asarray(wild), u_min))))
    assert eig.min() >= u_min * (1 - 1e-9)


def test_cholesky_params_repair_non_positive_definite():
    bad = np.array([[0.1, 0.1, 0.1, 0.2, 0.0, 0.0]])  # eigenvalue 0.1 − 0.2 < 0
    raw = cholesky_params(bad, eig_floor=1e-3)
    assert np.all(np.isfinite(raw))
    eig = np.linalg.eigvalsh(u_matrix(np.asarray(u_from_cholesky(jnp.asarray(raw)))))
    assert eig.min() == pytest.approx(1e-3, rel=1e-6)


def test_cholesky_gradient_matches_finite_differences():
    raw = jnp.asarray(cholesky_params(random_u(4), 0.01))
    w = jnp.asarray(np.random.default_rng(5).normal(size=(4, 6)))
    central_difference_check(lambda r: jnp.sum(w * u_from_cholesky(r, 0.01)), raw)


def test_b_eq_of_isotropic_u():
    b = jnp.asarray([5.0, 20.0, 80.0])
    np.testing.assert_allclose(np.asarray(b_eq(u_iso6(b))), np.asarray(b), rtol=TOL_EXACT)
    assert float(b_eq(jnp.asarray([[0.1, 0.2, 0.3, 0.05, 0.0, 0.0]]))[0]) == pytest.approx(EIGHT_PI2 * 0.2)


# ----------------------------------------------------------------- TLS
def tls_arrays(t=None, l=None, s=None, origin=(0.0, 0.0, 0.0)):
    z6 = np.zeros((1, 6))
    return (np.asarray(t, float)[None] if t is not None else z6, np.asarray(l, float)[None] if l is not None else z6,
            np.asarray(s, float)[None] if s is not None else np.zeros((1, 3, 3)), np.asarray(origin, float)[None])


def test_tls_with_isotropic_t_only_is_isotropic_b():
    b = 23.0
    t, l, s, o = tls_arrays(t=[b / EIGHT_PI2] * 3 + [0, 0, 0], origin=(4.0, -2.0, 7.0))
    xyz = np.random.default_rng(0).normal(scale=10, size=(20, 3))
    u = np.asarray(u_from_tls(t, l, s, o, xyz, np.zeros(20, np.int32)))
    np.testing.assert_allclose(u, np.asarray(u_iso6(jnp.full(20, b))), atol=TOL_EXACT)
    np.testing.assert_allclose(np.asarray(b_eq(u)), b, rtol=TOL_EXACT)


def test_tls_hand_computed_libration_and_screw():
    # libration about z (L33 = λ² rad²) of an atom at r = (x, 0, 0) from the origin: it moves
    # along y by λx, so U22 = λ²x² and nothing else; an atom on the axis does not move.
    lam2, x = 0.004, 3.0
    origin = (1.0, 1.0, 1.0)
    t, l, s, o = tls_arrays(l=[0, 0, lam2, 0, 0, 0], origin=origin)
    xyz = np.array([[1.0 + x, 1.0, 1.0], [1.0, 1.0, 9.0]])
    u = np.asarray(u_from_tls(t, l, s, o, xyz, np.zeros(2, np.int32)))
    np.testing.assert_allclose(u[0], [0, lam2 * x * x, 0, 0, 0, 0], atol=TOL_EXACT)
    np.testing.assert_allclose(u[1], 0.0, atol=TOL_EXACT)
    # screw coupling S_zy = <λ_z t_y> = σ: u_y = t_y + λ_z x, so U22 = 2σx (plus T and L parts);
    # by hand from U = A S + Sᵀ Aᵀ with A = [[0,0,0],[0,0,x],[0,-x,0]]: (A S)_22 = A_23 S_32 = xσ
    sig = 0.01
    smat = np.zeros((3, 3))
    smat[2, 1] = sig
    t, l, s, o = tls_arrays(s=smat)
    u = np.asarray(u_from_tls(t, l, s, o, np.array([[x, 0.0, 0.0]]), np.zeros(1, np.int32)))
    np.testing.assert_allclose(u[0], [0, 2 * sig * x, 0, 0, 0, 0], atol=TOL_EXACT)


def test_tls_cholesky_round_trip_and_positive_u():
    model = read_model(dataset_paths("1va7")[0])
    tls = read_tls_groups(model)
    raw = tls_cholesky_params(tls.t, tls.l, tls.s, eig_floor=1e-6)
    t, l, s = (np.asarray(a) for a in tls_from_cholesky(jnp.asarray(raw)))
    # groups whose deposited 6×6 covariance C = [[T, Sᵀ], [S, L]] is positive definite come back
    # exactly; the others (refinement programs do not enforce it) come back with C's negative
    # eigenvalues raised to the floor
    c = np.concatenate([np.concatenate([u_matrix(tls.t), np.swapaxes(tls.s, 1, 2)], 2),
                        np.concatenate([tls.s, u_matrix(tls.l)], 2)], 1)
    w, v = np.linalg.eigh(c)
    c_fixed = np.einsum("gij,gj,gkj->gik", v, np.maximum(w, 1e-6), v)
    np.testing.assert_allclose(t, np.stack([c_fixed[:, 0, 0], c_fixed[:, 1, 1], c_fixed[:, 2, 2], c_fixed[:, 0, 1],
                                            c_fixed[:, 0, 2], c_fixed[:, 1, 2]], -1), atol=1e-10)
    np.testing.assert_allclose(s, c_fixed[:, 3:, :3], atol=1e-10)
    pd = w.min(1) > 1e-6
    assert pd.any()
    np.testing.assert_allclose(l[pd], tls.l[pd], atol=1e-10)
    np.testing.assert_allclose(s[pd], tls.s[pd], atol=1e-10)
    # any raw vector gives TLS tensors whose U is positive semi-definite at every position
    wild = jnp.asarray(np.random.default_rng(4).normal(scale=2.0, size=(3, 21)))
    t, l, s = tls_from_cholesky(wild)
    xyz = np.random.default_rng(5).normal(scale=15.0, size=(300, 3))
    u = np.asarray(u_from_tls(t, l, s, np.zeros((3, 3)), xyz, np.arange(300) % 3))
    assert np.linalg.eigvalsh(u_matrix(u)).min() > -1e-10
    w6 = jnp.asarray(np.random.default_rng(6).normal(size=(20, 6)))
    central_difference_check(lambda r: jnp.sum(w6 * u_from_tls(*tls_from_cholesky(r), np.zeros((3, 3)), xyz[:20],
                                                               np.arange(20) % 3)), 0.3 * wild)


def test_tls_atoms_outside_groups_get_zero():
    t, l, s, o = tls_arrays(t=[0.1, 0.1, 0.1, 0, 0, 0])
    u = np.asarray(u_from_tls(t, l, s, o, np.ones((2, 3)), np.array([0, -1])))
    assert np.all(u[1] == 0) and u[0, 0] == pytest.approx(0.1)


def test_tls_matches_gemmi_on_deposited_groups_and_gradient():
    model = read_model(dataset_paths("1va7")[0])
    tls = read_tls_groups(model)
    assert tls is not None and tls.n_groups == 4
    inside = tls.group >= 0
    assert inside.sum() > 0.9 * (model.kind != "water").sum()  # the four chains are covered
    u = np.asarray(u_from_tls(tls.t, tls.l, tls.s, tls.origin, model.xyz_cart, tls.group))
    groups = model.structure.meta.refinement[0].tls_groups
    for i in np.flatnonzero(inside)[::97]:
        ref = gemmi.calculate_u_from_tls(groups[int(tls.group[i])], gemmi.Position(*model.xyz_cart[i]))
        np.testing.assert_allclose(u[i], [ref.u11, ref.u22, ref.u33, ref.u12, ref.u13, ref.u23], atol=TOL_GEMMI_TLS)
    # gradient w.r.t. L and S (what refinement moves)
    xyz, grp = jnp.asarray(model.xyz_cart[:60]), jnp.asarray(tls.group[:60])
    w = jnp.asarray(np.random.default_rng(2).normal(size=(60, 6)))
    central_difference_check(lambda l: jnp.sum(w * u_from_tls(tls.t, l, tls.s, tls.origin, xyz, grp)), tls.l)
    central_difference_check(lambda s: jnp.sum(w * u_from_tls(tls.t, tls.l, s, tls.origin, xyz, grp)), tls.s)


def test_tls_groups_from_spec():
    model = read_model(dataset_paths("1va7")[0])
    by_chain = tls_groups_from_spec(model, "chain")
    assert by_chain.n_groups == 4
    np.testing.assert_allclose(by_chain.origin[0], model.xyz_cart[model.chain_id == "A"].mean(0))
    two = tls_groups_from_spec(model, "A/1-30; A/31-200")
    assert two.n_groups == 2 and set(np.unique(two.group)) == {-1, 0, 1}
    assert np.all(two.group[(model.chain_id == "A") & (model.res_seq <= 30)] == 0)


def test_tls_and_anisou_round_trip_through_mmcif(tmp_path):
    """Write TLS groups and the resulting ANISOU with gemmi's mmCIF writer; read both back."""
    model = read_model(dataset_paths("1va7")[0])
    tls = read_tls_groups(model)
    u_tls = np.asarray(u_from_tls(tls.t, tls.l, tls.s, tls.origin, model.xyz_cart, tls.group))
    b_res = np.where(tls.group >= 0, 5.0 + 10.0 * np.random.default_rng(0).random(model.n_atoms), model.b_iso)
    u_total = np.where((tls.group >= 0)[:, None], u_tls + np.asarray(u_iso6(jnp.asarray(b_res))), 0.0)
    st = model.structure.clone()
    atoms = [a for ch in st[0] for r in ch for a in r]
    for a, u, inside, b in zip(atoms, u_total, tls.group >= 0, b_res):
        if inside:
            a.aniso = gemmi.SMat33f(*map(float, u))
            a.b_iso = float(b_eq(u))
    set_tls_groups(st, model, tls._replace(ids=tuple(f"g{k}" for k in range(tls.n_groups))))
    path = tmp_path / "tls.cif"
    st.make_mmcif_document().write_file(str(path))
    back = model_from_structure(gemmi.read_structure(str(path)), str(path))
    tls2 = read_tls_groups(back)
    assert tls2.ids == ("g0", "g1", "g2", "g3")
    np.testing.assert_array_equal(tls2.group, tls.group)
    for a, b in ((tls2.t, tls.t), (tls2.l, tls.l), (tls2.s, tls.s), (tls2.origin, tls.origin)):
        np.testing.assert_allclose(a, b, atol=TOL_FILE)
    # TLS read back + residual B = B_eq(ANISOU) − B_eq(U_TLS) reproduces the written ANISOU
    u_back = np.asarray(u_from_tls(tls2.t, tls2.l, tls2.s, tls2.origin, back.xyz_cart, tls2.group))
    b_resid = back.b_iso - np.asarray(b_eq(u_back))
    inside = tls2.group >= 0
    assert back.has_aniso[inside].all()
    np.testing.assert_allclose((u_back + np.asarray(u_iso6(jnp.asarray(b_resid))))[inside], back.u_aniso[inside], atol=TOL_FILE)


def test_tls_round_trip_through_pdb_remark_3(tmp_path):
    model = read_model(dataset_paths("1va7")[0])
    tls = read_tls_groups(model)
    st = model.structure.clone()
    header = ["REMARK   3", "REMARK   3 REFINEMENT.", "REMARK   3   PROGRAM     : JAXREFINE", "REMARK   3",
              "REMARK   3  DATA USED IN REFINEMENT.", "REMARK   3   RESOLUTION RANGE HIGH (ANGSTROMS) : 2.90"]
    st.raw_remarks = [h.ljust(80) + "\n" for h in header] + tls_pdb_remarks(model, tls)
    st.write_pdb(str(tmp_path / "tls.pdb"))
    back = read_tls_groups(read_model(tmp_path / "tls.pdb"))
    np.testing.assert_array_equal(back.group, tls.group)
    for a, b in ((back.t, tls.t), (back.l, tls.l), (back.s, tls.s), (back.origin, tls.origin)):
        np.testing.assert_allclose(a, b, atol=TOL_FILE)


# ----------------------------------------------------------------- ADP restraints
def chain_of_atoms(n=5, seed=0):
    rng = np.random.default_rng(seed)
    xyz = np.cumsum(rng.normal(size=(n, 3)) * 0.9 + [1.2, 0, 0], axis=0)
    p12 = np.stack([np.arange(n - 1), np.arange(1, n)], -1)
    p13 = np.stack([np.arange(n - 2), np.arange(2, n)], -1)
    return xyz, p12, p13


def test_adp_restraints_zero_for_equal_isotropic_u_and_rigid_bond_closed_form():
    xyz, p12, p13 = chain_of_atoms()
    term = aniso_adp_term(p12, p13, np.ones(5, bool), iso_pull=np.ones(5, bool))
    assert int(term.mask.sum()) == 4 + 3 and term.idx.shape[0] % 64 == 0
    u = np.asarray(u_iso6(jnp.full(5, 20.0)))
    assert float(aniso_adp_energy(jnp.asarray(xyz), jnp.asarray(u), term)) == 0.0
    # atom 0 elongated along its bond to atom 1 by δ: the rigid-bond delta is δ, so E = (δ/σ)²;
    # an elongation perpendicular to the bond leaves the rigid bond (not the similarity) at zero
    e = (xyz[1] - xyz[0]) / np.linalg.norm(xyz[1] - xyz[0])
    perp = np.cross(e, [0.0, 0.0, 1.0])
    perp /= np.linalg.norm(perp)
    delta = 0.01
    for v, expect in ((e, (delta / term.sigma_rigid[0]) ** 2), (perp, 0.0)):
        m = u_matrix(u[:1])[0] + delta * np.outer(v, v)
        u2 = u.copy()
        u2[0] = [m[0, 0], m[1, 1], m[2, 2], m[0, 1], m[0, 2], m[1, 2]]
        # only the (0,1) bond sees the change along the bond; the (0,2) 1-3 pair sees its projection
        e02 = (xyz[2] - xyz[0]) / np.linalg.norm(xyz[2] - xyz[0])
        expect_13 = (delta * np.dot(v, e02) ** 2 / term.sigma_rigid[4]) ** 2
        got = float(rigid_bond_energy(jnp.asarray(xyz), jnp.asarray(u2), term))
        assert got == pytest.approx(expect + expect_13, rel=1e-10, abs=1e-12)
        assert float(similarity_energy(jnp.asarray(u2), term)) > 0
        assert float(isotropy_energy(jnp.asarray(u2), term)) > 0


def test_adp_restraints_pairs_kept_only_for_anisotropic_atoms():
    _, p12, p13 = chain_of_atoms()
    aniso = np.array([True, False, False, False, False])
    term = aniso_adp_term(p12, p13, aniso)
    kept = {tuple(sorted(r)) for r, m in zip(term.idx.tolist(), term.mask) if m}
    assert kept == {(0, 1), (0, 2)}


def test_adp_restraint_gradients_match_finite_differences():
    xyz, p12, p13 = chain_of_atoms()
    term = aniso_adp_term(p12, p13, np.ones(5, bool), iso_pull=np.array([1, 0, 1, 0, 1], bool))
    raw = jnp.asarray(cholesky_params(random_u(5), 0.01))
    fn = lambda r: aniso_adp_energy(jnp.asarray(xyz), u_from_cholesky(r, 0.01), term, (1.0, 1.0, 1.0))  # noqa: E731
    central_difference_check(fn, raw, n_probe=10)
    u = jnp.asarray(random_u(5))
    central_difference_check(lambda x: rigid_bond_energy(x, u, term), jnp.asarray(xyz))
    rep = aniso_adp_report(jnp.asarray(xyz), u, term)
    assert rep["n_pairs"] == 7 and rep["rms_rigid_bond"] > 0 and rep["rms_similarity"] > 0
    # the report (numpy) agrees with the restraint functions (JAX): RMS of the deltas the energy is made of
    m = np.asarray(term.mask) > 0
    deltas = np.asarray(rigid_bond_deltas(jnp.asarray(xyz), u, term))[m]
    assert rep["rms_rigid_bond"] == pytest.approx(np.sqrt(np.mean(deltas**2)), rel=1e-5)
    unit_sim = term._replace(sigma_sim=jnp.ones_like(term.sigma_sim))  # Σ ‖U_i − U_j‖²_F over the pairs
    assert rep["rms_similarity"] == pytest.approx(np.sqrt(float(similarity_energy(u, unit_sim)) / (9 * 7)), rel=1e-5)


def test_adp_restraint_invariant_under_rotation_of_atoms_and_u():
    xyz, p12, p13 = chain_of_atoms()
    term = aniso_adp_term(p12, p13, np.ones(5, bool), iso_pull=np.ones(5, bool))
    u = random_u(5)
    r = np.asarray(rotation_matrix(jnp.asarray([0.3, -1.1, 0.7])))
    m = np.einsum("ij,njk,lk->nil", r, u_matrix(u), r)
    u_rot = np.stack([m[:, 0, 0], m[:, 1, 1], m[:, 2, 2], m[:, 0, 1], m[:, 0, 2], m[:, 1, 2]], -1)
    e0 = float(aniso_adp_energy(jnp.asarray(xyz), jnp.asarray(u), term))
    e1 = float(aniso_adp_energy(jnp.asarray(xyz @ r.T + 5.0), jnp.asarray(u_rot), term))
    assert e1 == pytest.approx(e0, rel=1e-10)


# ----------------------------------------------------------------- NCS
def test_ncs_copies_found_in_1va7_and_4iid():
    model = read_model(dataset_paths("1va7")[0])
    copies = find_ncs_copies(model)
    assert [c.name for c in copies] == ["A-B", "A-C", "A-D", "B-C", "B-D", "C-D"]
    for c in copies:
        assert len(c.atoms1) > 300
        assert np.all(model.atom_name[c.atoms1] == model.atom_name[c.atoms2])
        assert np.all(model.res_name[c.atoms1] == model.res_name[c.atoms2])
        assert np.all(model.chain_id[c.atoms1] == c.chain1) and np.all(model.chain_id[c.atoms2] == c.chain2)
    big = read_model(dataset_paths("4iid")[0])
    copies = find_ncs_copies(big)
    assert [c.name for c in copies] == ["A-B"] and len(copies[0].atoms1) > 3000
    # no copies in a single-chain model
    assert find_ncs_copies(read_model(dataset_paths("5kzb")[0])) == []


@pytest.fixture(scope="module")
def ncs_1va7():
    model = read_model(dataset_paths("1va7")[0])
    copies = find_ncs_copies(model)
    return model, copies, ncs_term(model.xyz_cart, [(c.atoms1, c.atoms2) for c in copies])


def test_ncs_local_pairs_are_every_pair_close_in_either_copy(ncs_1va7):
    """The k-d tree search against the plain m × m distance test, on the first pair of 1va7's copies."""
    model, copies, _ = ncs_1va7
    c = copies[0]
    got = local_pairs(model.xyz_cart, c.atoms1, c.atoms2)
    close = np.zeros((len(c.atoms1),) * 2, bool)
    for atoms in (c.atoms1, c.atoms2):
        x = model.xyz_cart[atoms]
        close |= np.sum((x[:, None] - x[None]) ** 2, axis=-1) < NCS_RADIUS**2
    i, j = np.nonzero(np.triu(close, 1))
    want = np.stack([c.atoms1[i], c.atoms1[j], c.atoms2[i], c.atoms2[j]], -1)
    assert len(want) > 1000
    np.testing.assert_array_equal(got, want)


def test_ncs_list_capacity_is_the_same_for_a_moved_model(ncs_1va7):
    """The pair count follows the coordinates (a shaken start has more close pairs than its refined model), the
    padded length does not: a rerun from the refined model gets the same shapes as the first run."""
    model, copies, term = ncs_1va7
    pairs = [(c.atoms1, c.atoms2) for c in copies]
    moved = ncs_term(model.xyz_cart + np.random.default_rng(3).normal(scale=0.3, size=model.xyz_cart.shape), pairs)
    n_dep, n_moved = int(term.mask.sum()), int(moved.mask.sum())
    assert abs(n_dep - n_moved) > 64  # more than one PAD_QUANTUM apart: each padded to its own length would differ
    assert term.idx.shape == moved.idx.shape
    assert term.idx.shape[0] >= max(n_dep, n_moved, NCS_PAIRS_PER_ATOM * sum(len(a) for a, _ in pairs))


def copy_rigidly(model, copies):
    """Coordinates where every copy of chain A is replaced by chain A moved by a rigid motion."""
    xyz = model.xyz_cart.copy()
    rng = np.random.default_rng(7)
    for c in copies:
        if c.chain1 == copies[0].chain1:
            r = np.asarray(rotation_matrix(jnp.asarray(rng.normal(size=3))))
            xyz[c.atoms2] = model.xyz_cart[c.atoms1] @ r.T + rng.normal(scale=20, size=3)
    return xyz


def test_ncs_energy_zero_for_rigid_copies_positive_otherwise(ncs_1va7):
    model, copies, term = ncs_1va7
    assert int(term.mask.sum()) > 1000
    e_dep = float(ncs_energy(jnp.asarray(model.xyz_cart), term))
    assert e_dep > 0  # the deposited copies differ
    xyz = copy_rigidly(model, copies)
    assert float(ncs_energy(jnp.asarray(xyz), term)) == pytest.approx(0.0, abs=TOL_RIGID_COPY)
    xyz[copies[0].atoms2[10]] += [0.2, 0.0, 0.0]
    assert float(ncs_energy(jnp.asarray(xyz), term)) > 1.0
    rep = ncs_report(jnp.asarray(model.xyz_cart), term, [c.name for c in copies])
    assert [r["copies"] for r in rep] == [c.name for c in copies]
    assert all(r["n_pairs"] > 0 and 0 < r["rms_delta"] <= r["max_delta"] for r in rep)
    # the report (numpy) is the RMS of the deltas the energy is made of (JAX), per pair of copies
    delta = np.asarray(ncs_deltas(jnp.asarray(model.xyz_cart), term))
    m = np.asarray(term.mask) > 0
    for k, r in enumerate(rep):
        d = delta[m & (np.asarray(term.copy_pair) == k)]
        assert r["n_pairs"] == d.size and r["rms_delta"] == pytest.approx(np.sqrt(np.mean(d * d)), rel=1e-4)


def test_ncs_gradient_matches_finite_differences(ncs_1va7):
    model, _, term = ncs_1va7
    central_difference_check(lambda x: ncs_energy(x, term), jnp.asarray(model.xyz_cart), n_probe=8)


def test_robust_function_saturates():
    c = 3.0
    z = jnp.asarray([0.0, 0.01, 1.0, 10.0, 1e3, 1e6])
    rho = np.asarray(geman_mcclure(z, c))
    assert rho[1] == pytest.approx(1e-4, rel=1e-4)  # quadratic near zero
    assert np.all(np.diff(rho) > 0) and rho[-1] < c * c and rho[-1] == pytest.approx(c * c, rel=1e-9)
    g = np.asarray(jax.vmap(jax.grad(lambda x: geman_mcclure(x, c)))(z))
    assert abs(g[-1]) < 1e-9 < g[2]  # a large difference stops pulling


# ----------------------------------------------------------------- the ADP model of a refinement
def test_automatic_adp_choice():
    from jaxrefine.problem.adp_model import choose_adp_model

    m4 = read_model(dataset_paths("4xof")[0], hydrogens=False)
    mode, why = choose_adp_model("auto", 1.15, 21100, m4)
    assert mode == "aniso" and "1.15" in why
    assert choose_adp_model("auto", 1.15, 5000, m4)[0] == "iso"  # too few reflections per parameter
    m1 = read_model(dataset_paths("1va7")[0])
    assert choose_adp_model("auto", 2.9, 5900, m1)[0] == "tls"
    assert choose_adp_model("auto", 2.0, 5900, m1)[0] == "iso"
    # 5orl: 1.69 Å, 37495 work reflections, 2191 non-water atoms + 197 waters: 1.83 per parameter with
    # anisotropic U; from the shaken start R-free 0.241 iso -> 0.227 aniso (servalcat, isotropic: 0.232)
    m5 = read_model(dataset_paths("5orl")[0], hydrogens=False)
    mode, why = choose_adp_model("auto", 1.69, 37495, m5)
    assert mode == "aniso" and "1.8 work reflections" in why
    assert choose_adp_model("auto", 1.69, 30000, m5)[0] == "iso"  # 1.46 per parameter
    assert choose_adp_model("auto", 1.9, 60000, m5)[0] == "iso"  # enough data, but not the resolution
    assert choose_adp_model("iso", 1.0, 10**6, m1) == ("iso", "refine.adp=iso")


def test_aniso_start_reproduces_deposited_anisou():
    from jaxrefine.problem.adp_model import atom_adp, build_adp_model

    model = read_model(dataset_paths("4xof")[0], hydrogens=False)
    adp, u_raw, tls_raw, b0, choice = build_adp_model(model, "aniso", "auto", 2.0, 1.15, 21100)
    assert choice.mode == "aniso" and tls_raw is None
    aniso = np.asarray(adp.aniso_index) >= 0
    assert aniso.sum() == choice.n_aniso == ((model.kind != "water") & ~model.is_hydrogen).sum()
    b_sf, u_sf, u_total = atom_adp(jnp.asarray(b0), jnp.asarray(u_raw), None, jnp.asarray(model.xyz_cart), adp)
    dep = aniso & model.has_aniso
    np.testing.assert_allclose(np.asarray(u_total)[dep], model.u_aniso[dep], atol=1e-6)  # PD deposited U come back
    assert np.all(np.asarray(b_sf)[aniso] == 0)
    np.testing.assert_allclose(np.asarray(b_eq(u_total))[~aniso], model.b_iso[~aniso], atol=0.2)  # waters: B (+ shape)


def test_tls_start_from_header_and_from_chains():
    from jaxrefine.problem.adp_model import atom_adp, build_adp_model

    model = read_model(dataset_paths("1va7")[0])
    adp, u_raw, tls_raw, b0, choice = build_adp_model(model, "tls", "auto", 2.0, 2.9, 5900)
    assert choice.tls.n_groups == 4 and "header" in choice.reason and "residual" in choice.reason
    _, _, u_total = atom_adp(jnp.asarray(b0), None, jnp.asarray(tls_raw), jnp.asarray(model.xyz_cart), adp)
    tls = read_tls_groups(model)
    u_dep = np.asarray(u_from_tls(tls.t, tls.l, tls.s, tls.origin, model.xyz_cart, tls.group))
    inside = tls.group >= 0
    # total B of the header's TLS + the B column (residual); groups whose deposited 6x6 TLS matrix is
    # not positive semi-definite are repaired, which moves B_eq by a few Å² at most
    d = np.asarray(b_eq(u_total))[inside] - (np.asarray(b_eq(u_dep)) + model.b_iso)[inside]
    assert np.median(np.abs(d)) < 2.0
    # groups per chain from scratch keep every atom's B_eq
    adp, _, tls_raw, b0, choice = build_adp_model(model, "tls", "chain", 2.0, 2.9, 5900)
    assert "chains" in choice.reason
    _, _, u_total = atom_adp(jnp.asarray(b0), None, jnp.asarray(tls_raw), jnp.asarray(model.xyz_cart), adp)
    keep = np.asarray(b0) > 3.0 + 1e-9  # not clamped at b_min + 1
    np.testing.assert_allclose(np.asarray(b_eq(u_total))[keep], model.b_iso[keep], atol=1e-6)


@pytest.mark.parametrize("pdb_id, mode", [("4xof", "aniso"), ("1va7", "tls")])
def test_starting_adps_on_the_host_match_the_traced_ones_and_compile_nothing(pdb_id, mode):
    """The setup's starting ADPs (build_adp_model's TLS start and atom_adp) run in numpy with no XLA program (they
    were two programs before the problem existed, on the cold run's critical path), and atom_adp in numpy gives
    what the same function gives traced and jitted (float64 here, so to round-off)."""
    from jaxrefine.core.cache import compile_counters, compile_delta
    from jaxrefine.problem.adp_model import atom_adp, build_adp_model

    model = read_model(dataset_paths(pdb_id)[0], hydrogens=False)
    before = compile_counters()
    adp, u_raw, tls_raw, b0, choice = build_adp_model(model, mode, "auto", 2.0, 2.0, 20000)
    host = atom_adp(np.asarray(b0, float), u_raw, tls_raw, model.xyz_cart, adp)
    spent = compile_delta(before)
    assert spent["compile_s"] == 0.0 and spent["trace_s"] == 0.0, spent
    assert choice.mode == mode and all(isinstance(a, np.ndarray) for a in host)
    traced = jax.jit(atom_adp)(jnp.asarray(b0), None if u_raw is None else jnp.asarray(u_raw),  # x64: conftest
                               None if tls_raw is None else jnp.asarray(tls_raw), jnp.asarray(model.xyz_cart),
                               jax.tree_util.tree_map(jnp.asarray, adp))
    for a, b in zip(host, traced):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("suffix", [".cif", ".pdb"])
def test_refined_tls_and_anisou_written_and_read_back_reproduce_the_adps(tmp_path, suffix):
    """model_updates -> writers -> file -> read_model -> TLS start from the header: the same U."""
    from types import SimpleNamespace

    from jaxrefine.config import load_config
    from jaxrefine.io.writers import write_model
    from jaxrefine.problem.adp_model import atom_adp, build_adp_model
    from jaxrefine.problem.params import b_to_raw
    from jaxrefine.problem.problem import Problem
    from jaxrefine.problem.setup import atom_maps_and_params
    from jaxrefine.refine.outputs import model_updates

    model = read_model(dataset_paths("1va7")[0])
    maps, params = atom_maps_and_params(model, load_config(None, ["refine.adp=tls"]), jnp.float64)
    adp, _, tls_raw, b0, choice = build_adp_model(model, "tls", "chain", 2.0, 2.9, 5900)
    rng = np.random.default_rng(11)
    params = params._replace(b_raw=jnp.asarray(b_to_raw(b0 + rng.uniform(0, 20, b0.shape), 2.0)),
                             tls_raw=jnp.asarray(tls_raw + rng.normal(scale=0.02, size=tls_raw.shape)))
    problem = Problem(maps=maps, sf=None, xray=None, restraints=None, geo_weights=None, w_b=None, adp=adp)
    upd = model_updates(params, problem, SimpleNamespace(model=model, adp_choice=choice), np.ones(model.n_atoms, bool))
    assert 20 < upd["b_iso"].mean() < 300  # realistic B: PDB's B column ends at 999.99
    path = tmp_path / f"refined{suffix}"
    write_model(model, path, remarks={"r_work": 0.2, "r_free": 0.25, "d_min": 2.9, "version": "test"}, **upd)
    back = read_model(path)
    assert back.meta["r_free"] == pytest.approx(0.25)  # the header's refinement record reads back (PDB too)
    adp2, _, tls_raw2, b2, choice2 = build_adp_model(back, "tls", "auto", 2.0, 2.9, 5900)
    assert "header" in choice2.reason and choice2.tls.n_groups == 4
    inside = np.asarray(adp2.tls_group) >= 0
    np.testing.assert_array_equal(inside, np.asarray(adp.tls_group) >= 0)
    _, _, u2 = atom_adp(jnp.asarray(b2), None, jnp.asarray(tls_raw2), jnp.asarray(back.xyz_cart), adp2)
    np.testing.assert_allclose(back.u_aniso[inside], upd["u_aniso"][inside], atol=TOL_FILE)
    tol = TOL_FILE if suffix == ".cif" else TOL_FILE_PDB_TLS
    np.testing.assert_allclose(np.asarray(u2)[inside], upd["u_aniso"][inside], atol=tol)


# ----------------------------------------------------------------- in the engine (5e5z, float64)
@pytest.fixture(scope="module")
def setups_5e5z():
    from jaxrefine.config import load_config
    from jaxrefine.io.reflections import read_reflections
    from jaxrefine.problem.setup import build_setup

    m, d = dataset_paths("5e5z")
    model, refl = read_model(m, hydrogens=False), read_reflections(d)
    return {mode: build_setup(None, None, load_config(None, ["refine.precision=float64", f"refine.adp={mode}",
                                                               "refine.tls_groups=chain"]), model=model, refl=refl)
            for mode in ("iso", "aniso", "tls")}


@pytest.mark.slow
@pytest.mark.parametrize("mode, leaf", [("aniso", "u_raw"), ("tls", "tls_raw"), ("tls", "b_raw")])
def test_total_energy_gradient_of_adp_parameters(setups_5e5z, mode, leaf):
    from jaxrefine.refine.energy import total_energy

    s = setups_5e5z[mode]
    p = s.params
    assert getattr(p, leaf).dtype == jnp.float64
    central_difference_check(lambda a: total_energy(p._replace(**{leaf: a}), s.problem, s.state), getattr(p, leaf),
                             n_probe=4, h=1e-5)


@pytest.mark.slow
def test_tls_with_only_isotropic_t_gives_the_isotropic_f_calc(setups_5e5z):
    """T = t·I, L = S ≈ 0 and residual B: F_calc equals the isotropic model's with B + 8π²t (same FFT setup)."""
    from jaxrefine.problem.params import atom_b, b_to_raw
    from jaxrefine.problem.xray_state import f_calc_of_jit as f_calc_of  # op by op it took ~10 s

    iso, tls = setups_5e5z["iso"], setups_5e5z["tls"]
    t_iso = 0.05  # Å² (B 3.9 Å²)
    raw = np.full((tls.params.tls_raw.shape[0], 21), 0.0)
    raw[:, :3] = np.log(np.expm1(np.sqrt(t_iso)))  # softplus⁻¹ of the factor's diagonal √t
    raw[:, 3:6] = -40.0  # L ≈ softplus(−40)² ≈ 2e-35 rad²
    b_res = np.asarray(atom_b(iso.params, iso.problem.maps))  # residual B (>= b_min)
    p = tls.params._replace(tls_raw=jnp.asarray(raw), b_raw=iso.params.b_raw)
    f_tls = np.asarray(f_calc_of(p, tls.problem))
    in_group = np.asarray(tls.problem.adp.tls_group) >= 0  # waters are in no group: residual B only
    assert in_group.sum() > 40
    p_iso = iso.params._replace(b_raw=jnp.asarray(b_to_raw(b_res + EIGHT_PI2 * t_iso * in_group, 2.0)))
    # the isotropic model without 5e5z's deposited ANISOU shapes (TLS atoms drop them by design),
    # on the FFT setup built for anisotropic U
    f_iso = np.asarray(f_calc_of(p_iso, iso.problem._replace(sf=tls.problem.sf, u_shape=None)))
    np.testing.assert_allclose(f_tls, f_iso, rtol=1e-9, atol=1e-9 * np.abs(f_iso).max())


@pytest.mark.slow
@pytest.mark.parametrize("mode, leaf", [("aniso", "u_raw"), ("tls", "tls_raw")])
def test_model_of_carries_refined_adps_into_a_rebuilt_setup(setups_5e5z, mode, leaf):
    """model_of -> Model with ANISOU (and TLS) -> rebuild_setup (the water-picking path): the same U for
    every atom, where the rebuild used to start again from the input's ANISOU / fresh TLS groups."""
    from jaxrefine.problem.adp_model import adp_of
    from jaxrefine.problem.setup import rebuild_setup
    from jaxrefine.problem.xray_state import model_of

    s = setups_5e5z[mode]
    rng = np.random.default_rng(5)
    raw = getattr(s.params, leaf)
    p = s.params._replace(**{leaf: raw + jnp.asarray(rng.normal(scale=0.05, size=raw.shape))})
    u_total = np.asarray(adp_of(p, s.problem)[2])
    moved = model_of(s.model, p, s.problem, s.adp_choice)
    has = np.asarray(moved.has_aniso, bool)
    assert has.sum() > 40
    np.testing.assert_allclose(moved.u_aniso[has], u_total[has], atol=1e-6)  # gemmi keeps U in float32
    again = rebuild_setup(s, moved)
    assert again.adp_choice.mode == mode
    if mode == "tls":
        assert "header" in again.adp_choice.reason
    u_again = np.asarray(adp_of(again.params, again.problem)[2])
    np.testing.assert_allclose(u_again[has], u_total[has], atol=1e-4)  # Å²; B 0.008 Å²
    assert np.abs(u_again[has] - np.asarray(adp_of(s.params, s.problem)[2])[has]).max() > 1e-3  # the perturbation is seen
