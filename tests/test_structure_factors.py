"""Structure factors: closed form, gemmi reference, FFT vs direct, gradients, invariances, jit."""
from __future__ import annotations

import gemmi
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrefine.cli import main as cli_main
from jaxrefine.core.crystal import Crystal, orth_matrix, s2_of, symmetry_equivalents
from jaxrefine.io.formfactor_io import form_factors, it92_form_factors
from jaxrefine.io.miller_io import unique_miller_indices
from jaxrefine.io.model import read_model
from jaxrefine.io.reflections import read_reflections
from jaxrefine.xray.formfactors import f0
from jaxrefine.xray.structure_factors import (
    EIGHT_PI2,
    f_from_grid,
    make_sf_setup,
    split_adp,
    structure_factors,
)

from conftest import DATASETS, dataset_paths

# ---- tolerances (one place, with the reason) ----
# the accuracy targets: FFT vs direct amplitude R and |F|-weighted phase difference
TOL_FFT_R = 1e-3
TOL_FFT_PHASE_DEG = 0.5
# direct vs gemmi with the same IT92 table: both are exact sums, they differ by rounding only
TOL_GEMMI_R = 5e-4
# closed forms and identities evaluated exactly (direct) in float64
TOL_EXACT = 1e-10
# the FFT path's own accuracy on a single atom / shifted model (aliasing + box truncation)
TOL_FFT_SINGLE = 2e-3
# float64 autodiff vs central differences of the same function
TOL_FD = 1e-4
# FFT gradient vs direct gradient: limited by the FFT's accuracy (~1e-4 in F), amplified in dT/dx
TOL_GRAD_FFT_VS_DIRECT = 1e-2
# float32 vs float64 (the limit)
TOL_F32 = 2e-3
N_SUBSET = 1000  # reflections for the direct reference on real data (keeps the file within budget)


def r_amp(f, f_ref):
    """Σ||F| − |F_ref|| / Σ|F_ref|."""
    return float(np.sum(np.abs(np.abs(f) - np.abs(f_ref))) / np.sum(np.abs(f_ref)))


def phase_diff_deg(f, f_ref):
    """|F_ref|-weighted mean phase difference (degrees)."""
    d = np.degrees(np.abs(np.angle(np.asarray(f) * np.conj(f_ref))))
    return float(np.sum(d * np.abs(f_ref)) / np.sum(np.abs(f_ref)))


def p1_crystal(cell):
    orth = orth_matrix(cell)
    return Crystal(
        cell=np.asarray(cell, float),
        space_group="P 1",
        sg_number=1,
        rot=np.eye(3)[None],
        trans=np.zeros((1, 3)),
        n_primitive_ops=1,
        orth=orth,
        frac=np.linalg.inv(orth),
    )


def model_arrays(model, aniso=False):
    b, u = split_adp(model.b_iso, model.u_aniso, model.has_aniso) if aniso else (model.b_iso, None)
    args = (jnp.asarray(model.xyz_frac), jnp.asarray(b), jnp.asarray(model.occ))
    return args, (None if u is None else jnp.asarray(u))


def subset(hkl, n, seed=0):
    if len(hkl) <= n:
        return hkl
    return hkl[np.sort(np.random.default_rng(seed).choice(len(hkl), n, replace=False))]


def gemmi_fcalc(model_path, hkl):
    """gemmi's StructureFactorCalculatorX (IT92, ANISOU used where present), hydrogens removed."""
    st = gemmi.read_structure(str(model_path))
    st.setup_entities()
    st.remove_hydrogens()
    calc = gemmi.StructureFactorCalculatorX(st.cell)
    return np.array([calc.calculate_sf_from_model(st[0], [int(v) for v in h]) for h in hkl])


# ----------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_one_atom_closed_form(method):
    """One atom in P1: |F| = occ f0(s) exp(−B s²/4) (International Tables B, eq. 1.2.7.1)."""
    crystal = p1_crystal([23.0, 27.0, 31.0, 80.0, 95.0, 105.0])
    hkl = unique_miller_indices(crystal, 2.0)
    ff = it92_form_factors(["O"])
    occ, b = 0.7, 18.0
    x = jnp.array([[0.123, 0.456, 0.789]])
    setup = make_sf_setup(crystal, hkl, ff, method, d_min=2.0, b_iso=np.array([b]))
    f = np.asarray(jax.jit(structure_factors)(x, jnp.array([b]), jnp.array([occ]), setup))
    s2 = s2_of(hkl, crystal)
    expect = occ * np.asarray(f0(ff, s2))[:, 0] * np.exp(-b * s2 / 4)
    tol = TOL_EXACT if method == "direct" else TOL_FFT_SINGLE
    assert np.max(np.abs(np.abs(f) - expect)) / expect.max() < tol
    # the phase is 2π h·x
    ph = np.angle(f * np.exp(-2j * np.pi * hkl @ np.asarray(x[0])))
    assert np.sum(np.abs(ph) * np.abs(f)) / np.sum(np.abs(f)) < (1e-9 if method == "direct" else 1e-3)


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_isotropic_u_equals_b(method):
    """An atom with U = B/(8π²)·I (Cartesian) scatters as with B_iso (Trueblood et al. 1996)."""
    model = read_model(dataset_paths("5e5z")[0], hydrogens=False)
    ff = it92_form_factors(model.element)
    hkl = unique_miller_indices(model.crystal, 1.8)
    b = np.full(model.n_atoms, 15.0)
    u = np.zeros((model.n_atoms, 6))
    u[:, :3] = b[:, None] / EIGHT_PI2
    setup = make_sf_setup(model.crystal, hkl, ff, method, b_iso=b, u_aniso=u)
    x, q = jnp.asarray(model.xyz_frac), jnp.asarray(model.occ)
    sf = jax.jit(structure_factors)
    f_iso = np.asarray(sf(x, jnp.asarray(b), q, setup))
    f_u = np.asarray(sf(x, jnp.zeros(model.n_atoms), q, setup, jnp.asarray(u)))
    assert r_amp(f_u, f_iso) < TOL_EXACT * (1 if method == "direct" else 1e4)
    assert phase_diff_deg(f_u, f_iso) < 1e-6


# ----------------------------------------------------------------------- real-data accuracy


@pytest.mark.slow
@pytest.mark.parametrize("pdb_id", DATASETS)
def test_direct_matches_gemmi(pdb_id):
    """Direct summation vs gemmi's StructureFactorCalculatorX (same IT92 table; ANISOU on 4xof)."""
    model_path, data_path = dataset_paths(pdb_id)
    model = read_model(model_path, hydrogens=False)
    hkl = subset(read_reflections(data_path).hkl, 300)
    aniso = bool(model.has_aniso.any())
    (x, b, q), u = model_arrays(model, aniso=aniso)
    setup = make_sf_setup(model.crystal, hkl, it92_form_factors(model.element), "direct")
    f = np.asarray(jax.jit(structure_factors)(x, b, q, setup, u))
    f_ref = gemmi_fcalc(model_path, hkl)
    print(f"{pdb_id}: direct vs gemmi R {r_amp(f, f_ref):.2e}, phase {phase_diff_deg(f, f_ref):.2e} deg")
    assert r_amp(f, f_ref) < TOL_GEMMI_R
    assert phase_diff_deg(f, f_ref) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("pdb_id", DATASETS)
def test_fft_matches_direct(pdb_id):
    """FFT vs direct at the data's resolution, all reflections by FFT, a random subset directly."""
    model_path, data_path = dataset_paths(pdb_id)
    model = read_model(model_path, hydrogens=False)
    refl = read_reflections(data_path)
    ff = it92_form_factors(model.element)
    aniso = bool(model.has_aniso.any())
    (x, b, q), u = model_arrays(model, aniso=aniso)
    d_min = float(refl.d.min())
    fft = make_sf_setup(model.crystal, refl.hkl, ff, "fft", d_min=d_min, b_iso=b, u_aniso=u)
    f_fft = np.asarray(jax.jit(structure_factors)(x, b, q, fft, u))
    pick = subset(np.arange(refl.n), N_SUBSET)
    direct = make_sf_setup(model.crystal, refl.hkl[pick], ff, "direct")
    f_dir = np.asarray(jax.jit(structure_factors)(x, b, q, direct, u))
    print(f"{pdb_id}: FFT vs direct R {r_amp(f_fft[pick], f_dir):.2e}, phase {phase_diff_deg(f_fft[pick], f_dir):.4f} deg")
    assert r_amp(f_fft[pick], f_dir) < TOL_FFT_R
    assert phase_diff_deg(f_fft[pick], f_dir) < TOL_FFT_PHASE_DEG


@pytest.mark.slow
def test_fft_matches_direct_with_hydrogens():
    """4xof with its 704 deposited hydrogens (as riding hydrogens scatter in a refinement): the FFT still
    within TOL_FFT_R of the direct sum although each hydrogen's box is cut at a carbon's density level
    (make_sf_setup: a box ~0.6 the volume of one cut at its own level)."""
    from jaxrefine.xray.structure_factors import _form_factor_extent

    model_path, data_path = dataset_paths("4xof")
    model = read_model(model_path, hydrogens=True)
    refl = read_reflections(data_path)
    assert model.is_hydrogen.sum() == 704
    ff = it92_form_factors(model.element)
    (x, b, q), u = model_arrays(model, aniso=bool(model.has_aniso.any()))
    fft = make_sf_setup(model.crystal, refl.hkl, ff, "fft", d_min=float(refl.d.min()), b_iso=b, u_aniso=u)
    f_fft = np.asarray(jax.jit(structure_factors)(x, b, q, fft, u))
    pick = subset(np.arange(refl.n), N_SUBSET)
    f_dir = np.asarray(jax.jit(structure_factors)(x, b, q, make_sf_setup(model.crystal, refl.hkl[pick], ff, "direct"), u))
    print(f"4xof with H: FFT vs direct R {r_amp(f_fft[pick], f_dir):.2e}, phase {phase_diff_deg(f_fft[pick], f_dir):.4f} deg")
    assert r_amp(f_fft[pick], f_dir) < TOL_FFT_R
    assert phase_diff_deg(f_fft[pick], f_dir) < TOL_FFT_PHASE_DEG
    h = np.flatnonzero(model.is_hydrogen)[:1]
    own, floor = (_form_factor_extent(ff._replace(type_index=np.asarray(ff.type_index)[h]), np.array([30.0]), np.log(1e3), z)
                  for z in (0.0, 6.0))
    assert floor[0] < 0.8 * own[0]  # the hydrogen's box shrinks
    # the hydrogens (no ANISOU) in classes of their own, spread as isotropic Gaussians: the same F to the FFT's accuracy
    iso = make_sf_setup(model.crystal, refl.hkl, ff, "fft", d_min=float(refl.d.min()), b_iso=b, u_aniso=u,
                        iso_atoms=model.is_hydrogen)
    assert iso.meta.iso_classes and all(np.all(np.asarray(model.is_hydrogen)[np.asarray(iso.box_atoms[c])])
                                        for c in iso.meta.iso_classes)
    assert sum(int(a.shape[0]) for a in iso.box_atoms) == model.n_atoms
    f_iso = np.asarray(jax.jit(structure_factors)(x, b, q, iso, u))
    print(f"4xof, H as isotropic classes: FFT vs direct R {r_amp(f_iso[pick], f_dir):.2e}, against one path {r_amp(f_iso, f_fft):.2e}")
    assert r_amp(f_iso[pick], f_dir) < TOL_FFT_R and phase_diff_deg(f_iso[pick], f_dir) < TOL_FFT_PHASE_DEG
    assert r_amp(f_iso, f_fft) < 0.5 * TOL_FFT_R


# ------------------------------------------------------------------------------- gradients


def _ls_target(setup, f_obs):
    def target(x, b, q):
        return jnp.sum((jnp.abs(structure_factors(x, b, q, setup)) - f_obs) ** 2)

    return target


@pytest.fixture(scope="module")
def small_problem():
    """5e5z (47 atoms, P21) with its observed amplitudes and both setups."""
    model_path, data_path = dataset_paths("5e5z")
    model = read_model(model_path, hydrogens=False)
    refl = read_reflections(data_path)
    ff = it92_form_factors(model.element)
    (x, b, q), _ = model_arrays(model)
    b = jnp.maximum(b, 5.0)  # 5e5z has B = 0 atoms; keep B + δ positive in the differences
    setups = {m: make_sf_setup(model.crystal, refl.hkl, ff, m, b_iso=b) for m in ("direct", "fft")}
    return model, refl, (x, b, q), setups


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_gradient_matches_finite_differences(small_problem, method):
    """Autodiff dT/d(x, B, occ) of an LS target vs central differences, float64."""
    model, refl, (x, b, q), setups = small_problem
    target = _ls_target(setups[method], jnp.asarray(refl.f_obs))
    grads = jax.jit(jax.grad(target, argnums=(0, 1, 2)))(x, b, q)
    f = jax.jit(target)
    rng = np.random.default_rng(1)
    for arg, g, step in ((0, grads[0], 1e-6), (1, grads[1], 1e-4), (2, grads[2], 1e-6)):
        args = [x, b, q]
        for _ in range(3):
            idx = tuple(rng.integers(0, s) for s in args[arg].shape)
            plus, minus = list(args), list(args)
            plus[arg] = args[arg].at[idx].add(step)
            minus[arg] = args[arg].at[idx].add(-step)
            fd = (f(*plus) - f(*minus)) / (2 * step)
            scale = float(jnp.max(jnp.abs(g)))
            assert abs(float(g[idx]) - float(fd)) <= TOL_FD * scale, (arg, idx, float(g[idx]), float(fd))


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_aniso_gradient_matches_finite_differences(method):
    """dT/dU (Cartesian ANISOU of 5e5z) by autodiff vs central differences, float64."""
    model_path, data_path = dataset_paths("5e5z")
    model = read_model(model_path, hydrogens=False)
    refl = read_reflections(data_path)
    (x, b, q), u = model_arrays(model, aniso=True)
    setup = make_sf_setup(model.crystal, refl.hkl, it92_form_factors(model.element), method, b_iso=b, u_aniso=u)
    f_obs = jnp.asarray(refl.f_obs)

    def target(u):
        return jnp.sum((jnp.abs(structure_factors(x, b, q, setup, u)) - f_obs) ** 2)

    g = jax.jit(jax.grad(target))(u)
    f = jax.jit(target)
    step = 1e-6
    scale = float(jnp.max(jnp.abs(g)))
    aniso_atoms = np.flatnonzero(model.has_aniso)
    for i, k in ((aniso_atoms[0], 0), (aniso_atoms[5], 3), (aniso_atoms[-1], 5)):
        fd = (f(u.at[i, k].add(step)) - f(u.at[i, k].add(-step))) / (2 * step)
        assert abs(float(g[i, k]) - float(fd)) <= TOL_FD * scale, (i, k, float(g[i, k]), float(fd))


def test_isotropic_classes_beside_anisotropic_ones_match_the_direct_sum_and_its_gradient():
    """5e5z with the second half of its atoms made isotropic (U = 0, B 15 Å²) and given to make_sf_setup as
    iso_atoms: they get classes of their own spread as isotropic Gaussians, and F and the gradient wrt
    coordinates, B and U match the direct sum (float64)."""
    model_path, data_path = dataset_paths("5e5z")
    model = read_model(model_path, hydrogens=False)
    refl = read_reflections(data_path)
    (x, b, q), u = model_arrays(model, aniso=True)
    half = np.arange(model.n_atoms) >= model.n_atoms // 2
    u = jnp.where(half[:, None], 0.0, u)
    b = jnp.where(half, 15.0, b)
    ff = it92_form_factors(model.element)
    # class_points=0: this small model would take one class for all atoms (CLASS_MIN_POINTS), not the split under test
    fft = make_sf_setup(model.crystal, refl.hkl, ff, "fft", b_iso=b, u_aniso=u, iso_atoms=half, class_points=0)
    assert fft.meta.iso_classes and all(np.all(half[np.asarray(fft.box_atoms[c])]) for c in fft.meta.iso_classes)
    direct = make_sf_setup(model.crystal, refl.hkl, ff, "direct")
    f_obs = jnp.asarray(refl.f_obs)

    def target(setup):
        return lambda x, b, u: jnp.sum((jnp.abs(structure_factors(x, b, q, setup, u)) - f_obs) ** 2)

    f = {m: np.asarray(jax.jit(structure_factors)(x, b, q, s, u)) for m, s in (("fft", fft), ("direct", direct))}
    assert r_amp(f["fft"], f["direct"]) < TOL_FFT_R
    g = {m: jax.jit(jax.grad(target(s), argnums=(0, 1, 2)))(x, b, u) for m, s in (("fft", fft), ("direct", direct))}
    for k, rows in ((0, slice(None)), (1, slice(None)), (2, ~half)):  # U of the anisotropic atoms only:
        gd, gf = np.asarray(g["direct"][k])[rows], np.asarray(g["fft"][k])[rows]
        assert np.linalg.norm(gf - gd) / np.linalg.norm(gd) < TOL_GRAD_FFT_VS_DIRECT, k
    assert not np.any(np.asarray(g["fft"][2])[half])  # an isotropic class's U (zero by contract) does not enter F


def test_fft_gradient_matches_direct_gradient(small_problem):
    model, refl, (x, b, q), setups = small_problem
    f_obs = jnp.asarray(refl.f_obs)
    g = {m: jax.jit(jax.grad(_ls_target(setups[m], f_obs), argnums=(0, 1, 2)))(x, b, q) for m in setups}
    for k in range(3):
        gd, gf = np.asarray(g["direct"][k]), np.asarray(g["fft"][k])
        print(f"gradient {k}: |g_fft - g_direct| / |g_direct| = {np.linalg.norm(gf - gd) / np.linalg.norm(gd):.2e}")
        assert np.linalg.norm(gf - gd) / np.linalg.norm(gd) < TOL_GRAD_FFT_VS_DIRECT


@pytest.mark.parametrize("z_coupled", [False, True])
@pytest.mark.parametrize("chunked", ["no", "backward", "both"])
def test_spreading_rule_matches_autodiff(z_coupled, chunked, monkeypatch):
    """The hand-written VJP of spread_boxes equals reverse-mode autodiff of the plain spreading
    (gaussian_boxes + add_boxes) for every input, float64; boxes that wrap the cell included; in one
    pass and over chunks of atoms (7 atoms in chunks of 2: the last chunk padded), the backward pass alone or
    the forward pass too (its padded atoms must add nothing); box rows with the corners cut, so that no row
    starts at the box's first index."""
    from jaxrefine.xray import fft_grid
    from jaxrefine.xray.fft_grid import add_boxes, box_rows, gaussian_boxes, spread_boxes

    rng = np.random.default_rng(0)
    grid, box, m, k = (16, 18, 20), (7, 6, 8), 7, 3
    rows = box_rows(box, np.array([[0.35, 0.1], [0.1, 0.3]]), 2 * 6.9)  # corners cut: the first row is (1, 1)
    assert rows[0] == (1, 1)
    if chunked != "no":
        monkeypatch.setattr(fft_grid, "CHUNK_ABOVE", 1)
        monkeypatch.setattr(fft_grid, "CHUNK_POINTS", 2 * len(rows) * box[2])  # two atoms' boxes a chunk
    if chunked == "both":
        monkeypatch.setattr(fft_grid, "FORWARD_CHUNK_ABOVE", 1)
        monkeypatch.setattr(fft_grid, "FORWARD_CHUNK_POINTS", 2 * len(rows) * box[2])
        assert fft_grid._n_chunks(m, len(rows) * box[2], fft_grid.FORWARD_CHUNK_POINTS, 1) == 4
    p = jnp.asarray(rng.uniform(-2.0, 21.0, (m, 3)))
    a = rng.normal(size=(m, k, 3, 3)) * 0.3
    metric = jnp.asarray(np.einsum("mkab,mkcb->mkac", a, a) + 0.5 * np.eye(3))
    weight = jnp.asarray(rng.uniform(0.5, 2.0, (m, k)))
    padded = jnp.asarray(rng.normal(size=grid[:2] + (grid[2] + box[2],)))
    g = jnp.asarray(rng.normal(size=padded.shape))

    def plain(padded, p, metric, weight):
        start, vals = gaussian_boxes(p, metric, weight, box, rows, z_coupled)
        return jnp.sum(add_boxes(padded, grid, start, vals, rows) * g)

    def ruled(padded, p, metric, weight):
        return jnp.sum(spread_boxes(padded, p, metric, weight, grid, box, rows, z_coupled) * g)

    args = (padded, p, metric, weight)
    assert float(jax.jit(ruled)(*args)) == pytest.approx(float(jax.jit(plain)(*args)), rel=1e-14)
    for name, want, got in zip(("grid", "p", "metric", "weight"), jax.jit(jax.grad(plain, argnums=(0, 1, 2, 3)))(*args),
                               jax.jit(jax.grad(ruled, argnums=(0, 1, 2, 3)))(*args)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-12 * float(jnp.max(jnp.abs(want))), err_msg=name)


def test_point_reads_and_their_transpose_match_indexing():
    """_read_points (the F sampling's gather, with its own VJP) equals plain indexing of a batch of half-complex
    grids, its VJP equals JAX's VJP of the indexing (repeated indices included), and the linear transpose of that
    VJP (the forward derivative the Gauss–Newton step and the uncertainties take) equals JAX's JVP, float64."""
    from jaxrefine.xray.structure_factors import _read_points

    rng = np.random.default_rng(3)
    shape = (2, 5, 6, 4)
    ft = jnp.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape))
    idx = jnp.asarray(np.concatenate([rng.integers(0, n, (40, 1)) for n in shape[1:]], axis=1).astype(np.int32))
    idx = jnp.concatenate([idx, idx[:5]])  # repeated points: their cotangents add up

    def plain(f):
        return f[..., idx[:, 0], idx[:, 1], idx[:, 2]]

    def ruled(f):
        return _read_points(f, idx, shape)

    np.testing.assert_array_equal(np.asarray(ruled(ft)), np.asarray(plain(ft)))
    ct = jnp.asarray(rng.normal(size=(2, 45)) + 1j * rng.normal(size=(2, 45)))
    want_vjp = jax.vjp(plain, ft)[1](ct)[0]
    out, vjp = jax.vjp(ruled, ft)
    np.testing.assert_allclose(np.asarray(vjp(ct)[0]), np.asarray(want_vjp), rtol=0, atol=1e-12)
    tangent = jnp.asarray(rng.normal(size=shape) + 1j * rng.normal(size=shape))
    (forward,) = jax.linear_transpose(vjp, out)((tangent,))
    np.testing.assert_allclose(np.asarray(forward), np.asarray(jax.jvp(plain, (ft,), (tangent,))[1]), rtol=0, atol=1e-12)


def test_spreading_temporaries_one_class_at_a_time(monkeypatch):
    """The gradient's temporary memory: the box classes of a model are spread one after the other (XLA's CPU
    scheduler had computed every class's values before the first scatter: 4iid's Gauss–Newton program 313 -> 202 MB),
    and classes above FORWARD_CHUNK_ABOVE points in chunks of atoms (-> 95 MB).  Three classes of 1,500 atoms; each
    measure is compared with the program compiled without it, so a later XLA that orders them by itself shows here."""
    from jaxrefine.xray import fft_grid
    from jaxrefine.xray import structure_factors as sf_module

    crystal = p1_crystal([40.0, 44.0, 48.0, 90.0, 90.0, 90.0])
    b = np.repeat([10.0, 30.0, 80.0], 500)
    n = len(b)
    setup = make_sf_setup(crystal, unique_miller_indices(crystal, 2.0), it92_form_factors(np.array(["C"] * n)), "fft",
                          d_min=2.0, b_iso=b, dtype=jnp.float32, class_points=0)
    assert len(setup.meta.box) == 3

    def temp_mb():
        def target(x, b, q):
            return jnp.sum(jnp.abs(structure_factors(x, b, q, setup)) ** 2)

        spec = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((n, 3), (n,), (n,))]
        return jax.jit(jax.grad(target, argnums=(0, 1))).lower(*spec).compile().memory_analysis().temp_size_in_bytes / 1e6

    ordered = temp_mb()
    with monkeypatch.context() as m:
        m.setattr(sf_module, "_after", lambda x, y: x)
        unordered = temp_mb()
    monkeypatch.setattr(fft_grid, "FORWARD_CHUNK_ABOVE", 1)
    monkeypatch.setattr(fft_grid, "FORWARD_CHUNK_POINTS", 2**16)
    chunked = temp_mb()
    assert ordered < unordered - 1.0, (ordered, unordered)
    assert chunked < ordered - 1.0, (chunked, ordered)


# ------------------------------------------------------------------------------ invariance


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_symmetry_equivalents_have_equal_amplitudes(method):
    """|F(hR)| = |F(h)| and |F(−h)| = |F(h)| (5kzb, I 41 2 2: 16 operators with centring)."""
    model = read_model(dataset_paths("5kzb")[0], hydrogens=False)
    hkl = subset(unique_miller_indices(model.crystal, 3.5), 100)
    eq = symmetry_equivalents(hkl, model.crystal)  # (ops, n, 3)
    all_hkl = np.concatenate([eq.reshape(-1, 3), -hkl])
    (x, b, q), _ = model_arrays(model)
    setup = make_sf_setup(model.crystal, all_hkl, it92_form_factors(model.element), method, b_iso=b)
    amp = np.abs(np.asarray(jax.jit(structure_factors)(x, b, q, setup)))
    ref = amp[: len(hkl)]
    rel = np.abs(amp.reshape(-1, len(hkl)) - ref[None]) / ref.max()
    assert rel.max() < (1e-10 if method == "direct" else 1e-6)


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_translation_changes_only_phases(method):
    """P1 (1va7): moving every atom by t multiplies F(h) by exp(2πi h·t)."""
    model = read_model(dataset_paths("1va7")[0], hydrogens=False)
    hkl = unique_miller_indices(model.crystal, 3.0)
    (x, b, q), _ = model_arrays(model)
    setup = make_sf_setup(model.crystal, hkl, it92_form_factors(model.element), method, b_iso=b)
    t = np.array([0.1234, -0.377, 0.0521])
    sf = jax.jit(structure_factors)
    f = np.asarray(sf(x, b, q, setup))
    f_t = np.asarray(sf(x + t, b, q, setup))
    expect = f * np.exp(2j * np.pi * hkl @ t)
    tol = TOL_EXACT if method == "direct" else TOL_FFT_SINGLE
    assert np.max(np.abs(f_t - expect)) / np.max(np.abs(f)) < tol


# ---------------------------------------------------------------------- dtype, jit, memory


def test_float32_close_to_float64(small_problem):
    model, refl, (x, b, q), setups = small_problem
    f64 = np.asarray(jax.jit(structure_factors)(x, b, q, setups["fft"]))
    s32 = make_sf_setup(model.crystal, refl.hkl, it92_form_factors(model.element), "fft", b_iso=b, dtype=jnp.float32)
    f32 = jax.jit(structure_factors)(x.astype(jnp.float32), b.astype(jnp.float32), q.astype(jnp.float32), s32)
    assert f32.dtype == jnp.complex64
    assert r_amp(np.asarray(f32), f64) < TOL_F32
    assert phase_diff_deg(np.asarray(f32), f64) < 0.1


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_no_recompile_with_new_parameters(small_problem, method):
    """The setup is a jit argument; new parameter values (and a rebuilt setup) do not retrace."""
    model, refl, (x, b, q), setups = small_problem
    traces = []

    def fn(x, b, q, setup):
        traces.append(1)
        return structure_factors(x, b, q, setup)

    jf = jax.jit(fn)
    jf(x, b, q, setups[method]).block_until_ready()
    jf(x + 0.01, b * 1.1, q * 0.9, setups[method]).block_until_ready()
    rebuilt = make_sf_setup(model.crystal, refl.hkl, it92_form_factors(model.element), method, b_iso=b)
    jf(x, b, q, rebuilt).block_until_ready()
    assert len(traces) == 1
    assert jf._cache_size() == 1


@pytest.mark.parametrize("method", ["direct", "fft"])
def test_vmap_over_models(small_problem, method):
    """jax.vmap over a batch of coordinate sets gives the same F as separate calls."""
    model, refl, (x, b, q), setups = small_problem
    xs = jnp.stack([x, x + 0.003, x - 0.002])
    batched = jax.jit(jax.vmap(structure_factors, in_axes=(0, None, None, None)))(xs, b, q, setups[method])
    single = jax.jit(structure_factors)
    for i in range(3):
        np.testing.assert_allclose(np.asarray(batched[i]), np.asarray(single(xs[i], b, q, setups[method])), rtol=1e-10, atol=1e-9)


def test_direct_memory_bounded_for_20k_atoms():
    """The direct gradient of a 20,000-atom P1 model at 1.5 Å compiles to < 4 GB of buffers."""
    crystal = p1_crystal([70.0, 80.0, 90.0, 90.0, 90.0, 90.0])
    hkl = unique_miller_indices(crystal, 1.5)
    n = 20000
    ff = it92_form_factors(np.array(["C"] * n))
    setup = make_sf_setup(crystal, hkl, ff, "direct")
    target = _ls_target(setup, jnp.zeros(len(hkl)))
    spec = jax.ShapeDtypeStruct((n, 3), jnp.float64), jax.ShapeDtypeStruct((n,), jnp.float64)
    compiled = jax.jit(jax.value_and_grad(target, argnums=(0, 1, 2))).lower(spec[0], spec[1], spec[1]).compile()
    mem = compiled.memory_analysis()
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    assert total < 4e9, total / 1e9


# -------------------------------------------------------------------------- grids and CLI


def test_f_from_grid_of_a_gaussian():
    """A sampled normalised Gaussian of B on the grid transforms to exp(−B s²/4) (electrons = 1)."""
    crystal = p1_crystal([20.0, 22.0, 25.0, 90.0, 90.0, 90.0])
    hkl = unique_miller_indices(crystal, 3.0)
    shape = (40, 44, 50)
    frac = [np.arange(n) / n for n in shape]
    xyz = np.stack(np.meshgrid(*frac, indexing="ij"), -1) - 0.5
    xyz -= np.round(xyz)
    r2 = np.sum((xyz @ crystal.orth.T) ** 2, axis=-1)
    bb = 30.0
    rho = (4 * np.pi / bb) ** 1.5 * np.exp(-4 * np.pi**2 * r2 / bb)  # e/Å³ of one electron
    f = np.asarray(f_from_grid(jnp.asarray(rho), jnp.asarray(hkl), crystal))
    s2 = s2_of(hkl, crystal)
    assert np.max(np.abs(np.abs(f) - np.exp(-bb * s2 / 4))) < 1e-6
    # the compiled form (solvent masks) takes the cell's volume as an argument: a crystal of a screen whose cell
    # differs a little, on the same grid, reuses the program; F scales with the volume
    from jaxrefine.xray.structure_factors import _f_from_grid_compiled, f_from_grid_jit

    f1 = np.asarray(f_from_grid_jit(rho.astype(np.float32), hkl, crystal.volume))
    n_programs = _f_from_grid_compiled._cache_size()
    f2 = np.asarray(f_from_grid_jit(rho.astype(np.float32), hkl, 1.004 * crystal.volume))
    assert _f_from_grid_compiled._cache_size() == n_programs
    np.testing.assert_allclose(f1, f, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f2, 1.004 * f1, rtol=1e-6, atol=1e-7)


def test_form_factor_tables():
    ff = form_factors(["C", "O", "C"], "electron")
    assert ff.a.shape == (2, 5) and list(ff.type_index) == [0, 1, 0]
    e = gemmi.Element("O").c4322
    np.testing.assert_allclose(np.asarray(f0(ff, np.array([0.25])))[0, 1], e.calculate_sf(0.25 / 4), rtol=1e-6)
    n = form_factors(["C"], "neutron")
    np.testing.assert_allclose(np.asarray(f0(n, np.array([0.0, 1.0])))[:, 0], 6.646, rtol=1e-3)


@pytest.mark.parametrize("d_min, n_terms", [(2.9, 2), (1.69, 3), (1.15, 3)])
def test_refitted_form_factors(d_min, n_terms):
    """The FFT spreads each atom as the fewest Gaussians that give the model's F to FIT_TOL over the data's
    range (model_fit_error: the types' relative errors weighted by atom count and Z²) with no type beyond
    FIT_TYPE_CAP × FIT_TOL: 2 of IT92's 5 terms at 2.9 Å, 3 at 1.69 and 1.15 Å (measured); checked here against
    the table on a finer grid than the fit's and a little beyond it (the real-data FFT-vs-direct tests above
    check F itself against the direct sum over the IT92 table)."""
    from jaxrefine.xray.formfactors import FIT_TOL, FIT_TYPE_CAP, fit_form_factors, model_fit_error

    ff = it92_form_factors(np.array(["C", "N", "O", "S", "H", "MG", "CL", "P", "ZN"]))
    fitted, n = fit_form_factors(ff, 1.0 / d_min**2)
    assert n == n_terms and fitted.a.shape == (9, n_terms) and not np.any(fitted.c)
    s2 = np.linspace(0.0, 1.0 / d_min**2, 997)
    ref, got = np.asarray(f0(ff, s2)), np.asarray(f0(fitted, s2))
    per_type = np.max(np.abs(got / ref - 1.0), axis=0)
    assert np.all(per_type < 1.5 * FIT_TYPE_CAP * FIT_TOL)
    assert model_fit_error(per_type, np.asarray(ff.a).sum(1) + np.asarray(ff.c), np.ones(9)) < 1.5 * FIT_TOL
    assert np.all(np.asarray(fitted.b) > 0)  # every term a Gaussian: B + B_blur + b_k > 0 for the spreading


def test_gaussian_count_follows_the_models_composition():
    """At 1.15 Å three Gaussians give H's f0 to 1.9e-4 of itself only (C, N, O, S to 8e-5 or better): a model of
    hydrogens alone takes four, a protein with riding hydrogens (4xof's composition: 423 C, 110 N, 254 O, 1 S,
    704 H) three, as its F is good to FIT_TOL (Wilson: the errors add as Σ n_t (r_t Z_t)² against Σ n_t Z_t²);
    at 1.05 Å the errors of C and H take the protein to four.  model_fit_error is the weighted RMS."""
    from jaxrefine.xray.formfactors import fit_form_factors, model_fit_error

    protein = np.array(["C"] * 423 + ["N"] * 110 + ["O"] * 254 + ["S"] + ["H"] * 704)
    assert fit_form_factors(it92_form_factors(np.array(["H"] * 10)), 1.0 / 1.15**2)[1] == 4
    assert fit_form_factors(it92_form_factors(protein), 1.0 / 1.15**2)[1] == 3
    assert fit_form_factors(it92_form_factors(protein), 1.0 / 1.05**2)[1] == 4
    assert model_fit_error([2e-4, 0.0], [8.0, 6.0], [1, 3]) == pytest.approx(2e-4 * np.sqrt(64 / (64 + 108)))


def test_a_rare_type_beyond_the_cap_needs_more_gaussians():
    """FIT_TYPE_CAP: one type's f0 may not be further than FIT_TYPE_CAP × FIT_TOL from the table however few
    its atoms (H at 0.9 Å with three Gaussians: 1.1e-3 off, one H among 2000 nitrogens, which alone take three)."""
    from jaxrefine.xray.formfactors import FIT_TOL, FIT_TYPE_CAP, _fit_terms, fit_form_factors, model_fit_error

    s2 = float(np.float32(1.0 / 0.9**2))
    h = it92_form_factors(np.array(["H"]))
    err3 = _fit_terms(tuple(np.asarray(h.a)[0]) + tuple(np.asarray(h.b)[0]) + (float(np.asarray(h.c)[0]),), s2, 3)[2]
    assert err3 > FIT_TYPE_CAP * FIT_TOL
    assert model_fit_error([err3, 0.0], [1.0, 7.0], [1, 2000]) < FIT_TOL  # the weighted error alone would allow it
    assert fit_form_factors(it92_form_factors(np.array(["N"] * 2000)), 1.0 / 0.9**2)[1] == 3
    assert fit_form_factors(it92_form_factors(np.array(["N"] * 2000 + ["H"])), 1.0 / 0.9**2)[1] == 4


def test_refitted_form_factors_are_stored_and_read_back_exactly(tmp_path, monkeypatch):
    """With the cache folder on, the fits are kept in its tables/ (core.cache.write_table): a later process (here:
    the in-process fit cache cleared) reads them back bit for bit without fitting; an edit of the source (another
    digest) makes the table stale and the fits are made again."""
    import jax

    from jaxrefine.core import cache
    from jaxrefine.xray import formfactors as FF

    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    try:
        cache.enable_compilation_cache(str(tmp_path / "c"))
        ff = it92_form_factors(np.array(["C", "N", "O", "S"]))
        FF._fit_terms.cache_clear()
        first, n = FF.fit_form_factors(ff, 1.0 / 1.9**2)
        assert (tmp_path / "c" / cache.TABLES_SUBFOLDER / (FF.FIT_TABLE + ".json")).is_file()
        FF._fit_terms.cache_clear()
        calls = []
        monkeypatch.setattr(FF, "_fit_terms", lambda *a: calls.append(a) or (_ for _ in ()).throw(AssertionError("fitted")))
        again, n2 = FF.fit_form_factors(ff, 1.0 / 1.9**2)
        assert not calls and n2 == n
        for x, y in zip(first[:3], again[:3]):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        monkeypatch.setattr(cache, "_digest", ["another source"])
        with pytest.raises(AssertionError, match="fitted"):
            FF.fit_form_factors(ff, 1.0 / 1.9**2)
    finally:
        cache._set_dir(saved[0])
        jax.config.update("jax_enable_compilation_cache", saved[1])


def test_fft_setup_spreads_the_refitted_terms():
    """A 2.9 Å FFT setup carries the two-term fit (no constant term spread); fit_tol=None keeps IT92."""
    model_path, data_path = dataset_paths("1va7")
    model = read_model(model_path, hydrogens=False)
    hkl = read_reflections(data_path).hkl
    ff = it92_form_factors(model.element)
    fitted = make_sf_setup(model.crystal, hkl, ff, "fft", b_iso=model.b_iso)
    table = make_sf_setup(model.crystal, hkl, ff, "fft", b_iso=model.b_iso, fit_tol=None)
    assert fitted.ff.a.shape[1] == 2 and not fitted.meta.constant
    assert table.ff.a.shape[1] == 4 and table.meta.constant
    (x, b, q), u = model_arrays(model)
    f_fit, f_tab = (np.asarray(jax.jit(structure_factors)(x, b, q, st)) for st in (fitted, table))
    assert r_amp(f_fit, f_tab) < TOL_FFT_R


def test_cli_writes_fcalc(tmp_path):
    model_path, _ = dataset_paths("5e5z")
    out = tmp_path / "fc.mtz"
    assert cli_main(["-q", "sf", str(model_path), "--d-min", "2.0", "--hydrogens", "remove", "--out", str(out)]) == 0
    mtz = gemmi.read_mtz_file(str(out))
    assert mtz.column_labels() == ["H", "K", "L", "FC", "PHIC"]
    hkl = mtz.make_miller_array()
    model = read_model(model_path)
    assert len(hkl) == len(unique_miller_indices(model.crystal, 2.0))
    f = mtz.column_with_label("FC").array * np.exp(1j * np.radians(mtz.column_with_label("PHIC").array))
    f_ref = gemmi_fcalc(model_path, hkl)  # gemmi uses ANISOU as jaxrefine does
    assert r_amp(f, f_ref) < TOL_FFT_R
    assert phase_diff_deg(f, f_ref) < TOL_FFT_PHASE_DEG


def test_a_class_is_made_only_where_it_saves_enough_box_points():
    """CLASS_MIN_POINTS: 5e5z's 47 atoms take one box class (three would save fewer points than one class's compile
    is worth), 1va7 keeps three; with class_points=0 every class that saves any points is made.  The classes' cost
    (Σ atoms × box points) never falls below the unpenalised split's."""
    from jaxrefine.xray import structure_factors as S

    def setup(pdb, **kw):
        model = read_model(dataset_paths(pdb)[0], hydrogens=False)
        hkl = read_reflections(dataset_paths(pdb)[1]).hkl
        return make_sf_setup(model.crystal, hkl, it92_form_factors(model.element), "fft", b_iso=model.b_iso, **kw)

    def points(s):
        return sum(int(a.shape[0]) * int(np.prod(box)) for a, box in zip(s.box_atoms, s.meta.box))

    small, small_all = setup("5e5z"), setup("5e5z", class_points=0)
    assert len(small.meta.box) == 1 < len(small_all.meta.box)
    assert 0 < points(small) - points(small_all) < (len(small_all.meta.box) - 1) * S.CLASS_MIN_POINTS
    assert len(setup("1va7").meta.box) == 3


def test_a_setup_of_the_same_atoms_keeps_the_stored_box_classes(tmp_path, monkeypatch):
    """``reuse_classes``: a second setup of the same atoms on the same grid takes the box classes stored by the first
    when its atoms fit them (here with halved B, whose best layout has two classes, not three): the same static
    shapes, so a rerun from a refined model loads the first run's programs, and F as accurate as with its own best
    layout.  An atom beyond its stored class's B, or a stored layout above STORED_CLASS_COST × the best cost, gets
    the best layout, which is then stored; without ``reuse_classes`` nothing is read or stored."""
    from jaxrefine.core import cache
    from jaxrefine.xray import structure_factors as S

    model_path, data_path = dataset_paths("1va7")
    model = read_model(model_path, hydrogens=False)
    hkl = read_reflections(data_path).hkl
    ff = it92_form_factors(model.element)
    b = np.asarray(model.b_iso, float)

    def setup(b_iso, reuse=True):
        return make_sf_setup(model.crystal, hkl, ff, "fft", b_iso=b_iso, reuse_classes=reuse)

    def layout(s):
        return s.meta.box, s.meta.rows, [int(a.shape[0]) for a in s.box_atoms]

    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    try:
        cache.enable_compilation_cache(str(tmp_path / "c"))
        first = setup(b)
        best_half = setup(0.5 * b, reuse=False)
        assert layout(best_half) != layout(first)  # its own best layout would change the shapes
        half = setup(0.5 * b)
        assert layout(half) == layout(first)
        x, q = jnp.asarray(model.xyz_frac), jnp.asarray(model.occ)
        sf = jax.jit(structure_factors)
        f_half = np.asarray(sf(x, jnp.asarray(0.5 * b), q, half))
        f_best = np.asarray(sf(x, jnp.asarray(0.5 * b), q, best_half))
        direct = make_sf_setup(model.crystal, hkl, ff, "direct", b_iso=0.5 * b)
        f_direct = np.asarray(sf(x, jnp.asarray(0.5 * b), q, direct))
        assert r_amp(f_half, f_direct) <= max(r_amp(f_best, f_direct), 1e-4) * 1.5 and r_amp(f_half, f_direct) < TOL_FFT_R
        # a few atoms far beyond the stored classes' B: the best layout for them, stored in turn
        hot = b.copy()
        hot[:20] += 150.0
        assert layout(setup(hot)) == layout(setup(hot, reuse=False)) != layout(first)
        assert layout(setup(b)) == layout(setup(hot, reuse=False))  # the deposited B fit the hot layout
        # a stored layout costlier than the cap allows is not taken
        monkeypatch.setattr(S, "STORED_CLASS_COST", 1.0)
        assert layout(setup(0.5 * b)) == layout(best_half)
    finally:
        cache._set_dir(saved[0])
        jax.config.update("jax_enable_compilation_cache", saved[1])


def test_datasets_cut_within_one_grid_step_get_one_layout_and_an_accurate_f():
    """runtime.grid_steps: 1va7's data cut at 2.90-2.95 Å (a screen's crystals diffracting a little less far) get the
    grid, blur, form-factor fit and box rows of one resolution (d_min rounded down to 16 steps per octave), so one
    compiled program serves them all; made for each d_min itself, the rows differ (82 against 80 at 2.94 Å: a
    second program).  F on the step's finer grid stays within the FFT's accuracy of the direct sum."""
    from jaxrefine.xray.structure_factors import grid_resolution

    assert grid_resolution(2.9, 0) == 2.9 and grid_resolution(2.0, 16) == 2.0  # a step's own value maps to itself
    for d in (1.1, 1.664, 2.9, 3.2):
        assert d / 2 ** (1 / 16) < grid_resolution(d, 16) <= d
    model_path, data_path = dataset_paths("1va7")
    model, refl = read_model(model_path, hydrogens=False), read_reflections(data_path)
    ff = it92_form_factors(model.element)
    (x, b, q), _ = model_arrays(model, aniso=False)

    def setup(cut, steps):
        keep = refl.d >= cut
        return keep, make_sf_setup(model.crystal, refl.hkl[keep], ff, d_min=grid_resolution(float(refl.d[keep].min()), steps),
                                   b_iso=b, b_margin=15.0)

    def layout(s):
        return s.meta.grid_shape, s.meta.box, s.meta.rows, s.meta.constant, s.ff.a.shape, float(s.b_blur)

    cuts = (2.90, 2.92, 2.94, 2.95)
    assert len({layout(setup(c, 16)[1]) for c in cuts}) == 1
    assert len({layout(setup(c, 0)[1])[:5] for c in cuts}) > 1
    keep, fft = setup(2.95, 16)
    f_fft = np.asarray(jax.jit(structure_factors)(x, b, q, fft, None))
    pick = subset(np.arange(int(keep.sum())), N_SUBSET)
    f_dir = np.asarray(jax.jit(structure_factors)(x, b, q, make_sf_setup(model.crystal, refl.hkl[keep][pick], ff, "direct"),
                                                  None))
    print(f"1va7 at 2.95 Å on the 2.83 Å grid: FFT vs direct R {r_amp(f_fft[pick], f_dir):.2e}")
    assert r_amp(f_fft[pick], f_dir) < TOL_FFT_R and phase_diff_deg(f_fft[pick], f_dir) < TOL_FFT_PHASE_DEG



def test_one_layout_serves_a_range_of_cells_with_an_accurate_f():
    """runtime.cell_range: 5kzb's crystal (I4₁22) with its cell 0.6 % shorter, as deposited and 0.3 % longer
    (fractional coordinates kept: a screen's crystals of one form) gets one grid and box layout when each setup also
    serves the range's corners (layout_cells); made for each cell alone, the blur differs and the longest cell's
    box classes hold other atom counts (547 + 235 against 586 + 196: other shapes, another program).  F of the
    shortest cell on the shared layout stays within the FFT's accuracy of the direct sum."""
    import itertools

    from jaxrefine.core.crystal import with_cell
    from jaxrefine.xray.structure_factors import grid_resolution

    model_path, data_path = dataset_paths("5kzb")
    model, refl = read_model(model_path, hydrogens=False), read_reflections(data_path)
    ff = it92_form_factors(model.element)
    (x, b, q), _ = model_arrays(model, aniso=False)
    cell = np.asarray(model.crystal.cell, float)
    scales = (0.994, 1.0, 1.003)

    def crystal(f):
        return with_cell(model.crystal, cell * [f, f, f, 1, 1, 1])

    corners = sorted(set(itertools.product(*({lo, hi} for lo, hi in zip(crystal(scales[0]).cell, crystal(scales[-1]).cell)))))
    assert len(corners) == 8

    def setup(f, cells=()):  # the grid made for d_min on the fleet's ladder of resolutions (runtime.grid_steps)
        return make_sf_setup(crystal(f), refl.hkl, ff, d_min=grid_resolution(refl.d_min, 16), b_iso=b, b_margin=15.0,
                             layout_cells=cells)

    def layout(s):
        return (s.meta.grid_shape, s.meta.box, s.meta.rows, s.meta.cross_terms, tuple(len(a) for a in s.box_atoms),
                float(s.b_blur))

    shared = [setup(f, corners) for f in scales]
    assert len({layout(s) for s in shared}) == 1
    own = [layout(setup(f)) for f in scales]
    assert len({o[:5] for o in own}) == 2 and own[-1][4] == (547, 235) and len({o[5] for o in own}) == 3
    pick = subset(np.arange(refl.n), N_SUBSET)
    f_fft = np.asarray(jax.jit(structure_factors)(x, b, q, shared[0], None))[pick]
    direct = make_sf_setup(crystal(scales[0]), refl.hkl[pick], ff, "direct")
    f_dir = np.asarray(jax.jit(structure_factors)(x, b, q, direct, None))
    print(f"5kzb with its cell 0.6 % shorter on the range's layout: FFT vs direct R {r_amp(f_fft, f_dir):.2e}")
    assert r_amp(f_fft, f_dir) < TOL_FFT_R and phase_diff_deg(f_fft, f_dir) < TOL_FFT_PHASE_DEG
