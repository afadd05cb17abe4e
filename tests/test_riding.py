"""Riding hydrogens: placement (gemmi and deposited H as references), gradients, invariance."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from jaxrefine.io.hydrogens import riding_sites
from jaxrefine.io.model import read_model
from jaxrefine.problem.riding import riding_from_sites, riding_xyz, scattering_atoms

from conftest import dataset_paths, monomer_dir

PLACEMENT_TOL = 1e-6  # Å: the frame map reproduces gemmi's own placement (float64 round-off only)
DEPOSITED_MEDIAN_TOL = 0.05  # Å: 4xof's deposited riding H (SHELX/REFMAC ideal) vs the library's placement
DEPOSITED_P90_TOL = 0.25  # Å: methyl and NH3 rotors may sit at another staggered angle


def _sites(pdb_id):
    model_path, _ = dataset_paths(pdb_id)
    m = read_model(model_path, hydrogens=False)
    return m, riding_sites(m, monomer_dir())


def _placed_by_gemmi(sites):
    pos = {c.atom.serial: np.array(c.atom.pos.tolist()) for c in sites.structure[0].all() if c.atom.is_hydrogen()}
    return np.array([pos[int(k)] for k in sites.h_serial])


def test_riding_reproduces_gemmi_placement():
    m, s = _sites("5e5z")
    assert s.n > 30  # 5e5z: 6 residues, ~40 hydrogens with fixed positions
    h = np.asarray(riding_xyz(jnp.asarray(m.xyz_cart), riding_from_sites(s, jnp.float64)))
    assert np.abs(h - _placed_by_gemmi(s)).max() < PLACEMENT_TOL
    d = np.linalg.norm(h - m.xyz_cart[s.parent], axis=1)
    assert 0.8 < d.min() and d.max() < 1.1  # X-ray (electron-cloud) X–H distances of the library


def test_riding_matches_deposited_hydrogens_4xof():
    model_path, _ = dataset_paths("4xof")
    full = read_model(model_path, hydrogens=True)
    m, s = _sites("4xof")
    h = np.asarray(riding_xyz(jnp.asarray(m.xyz_cart), riding_from_sites(s, jnp.float64)))
    # nearest deposited H of the same residue (programs differ in naming prochiral H: HB2/HB3)
    dep_h = np.nonzero(full.is_hydrogen)[0]
    by_res = {}
    for i in dep_h:
        by_res.setdefault((full.chain_id[i], int(full.res_seq[i])), []).append(full.xyz_cart[i])
    dists = []
    for k in range(s.n):
        p = s.parent[k]
        cand = by_res.get((m.chain_id[p], int(m.res_seq[p])))
        if cand:
            dists.append(np.linalg.norm(np.array(cand) - h[k], axis=1).min())
    dists = np.array(dists)
    assert len(dists) > 0.8 * s.n
    assert np.median(dists) < DEPOSITED_MEDIAN_TOL, np.median(dists)
    assert np.percentile(dists, 90) < DEPOSITED_P90_TOL, np.percentile(dists, 90)


def _toy_riding():
    rng = np.random.default_rng(0)
    xyz = rng.normal(0, 1.5, (6, 3))
    from jaxrefine.problem.riding import Riding

    r = Riding(parent=jnp.array([0, 1, 2]), ref_a=jnp.array([1, 2, 3]), ref_b=jnp.array([2, 4, 5]),
               local=jnp.asarray(rng.normal(0, 0.6, (3, 3))), b_factor=jnp.asarray(1.0), h_serial=jnp.array([1, 2, 3]))
    return jnp.asarray(xyz), r


def test_riding_gradient_matches_finite_differences():
    xyz, r = _toy_riding()
    w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3)))
    check_grads(lambda x: jnp.sum(w * riding_xyz(x, r)), (xyz,), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_riding_follows_a_rigid_motion():
    xyz, r = _toy_riding()
    th = 0.7
    rot = jnp.array([[np.cos(th), -np.sin(th), 0], [np.sin(th), np.cos(th), 0], [0, 0, 1.0]])
    t = jnp.array([3.0, -1.0, 2.0])
    moved = riding_xyz(xyz @ rot.T + t, r)
    np.testing.assert_allclose(moved, riding_xyz(xyz, r) @ rot.T + t, atol=1e-10)


def test_scattering_atoms_append_hydrogens_with_parent_b_and_occupancy():
    xyz, r = _toy_riding()
    b = jnp.arange(6.0) + 10
    occ = jnp.linspace(0.5, 1.0, 6)
    same = scattering_atoms(xyz, b, occ, None)
    assert same[0] is xyz and same[1] is b
    x2, b2, o2 = scattering_atoms(xyz, b, occ, r._replace(b_factor=jnp.asarray(1.2)))
    assert x2.shape == (9, 3)
    np.testing.assert_allclose(b2[6:], 1.2 * b[:3])
    np.testing.assert_allclose(o2[6:], occ[:3])


def test_refresh_keeps_frames_and_follows_new_coordinates():
    m, s = _sites("5e5z")
    moved = m.xyz_cart + np.random.default_rng(3).normal(0, 0.1, m.xyz_cart.shape)
    s2 = riding_sites(m, monomer_dir(), xyz_cart=moved, like=s)
    for f in ("parent", "ref_a", "ref_b", "h_serial"):
        assert np.array_equal(getattr(s2, f), getattr(s, f))
    h = np.asarray(riding_xyz(jnp.asarray(moved), riding_from_sites(s2, jnp.float64)))
    np.testing.assert_allclose(h, _placed_by_gemmi(riding_sites(m, monomer_dir(), xyz_cart=moved)), atol=PLACEMENT_TOL)
    assert not np.allclose(s2.local, s.local)  # the local geometry was re-derived



def test_frame_coordinates_rebuild_the_hydrogen_in_the_energy():
    """The frames of setup and of the per-cycle refresh (vectorised) give local coordinates from which the energy's
    riding_xyz (JAX, written separately) puts each hydrogen back where it was; collinear frames are flagged."""
    from jaxrefine.io.hydrogens import frame_coordinates, frame_coordinates_many
    from jaxrefine.problem.riding import Riding

    rng = np.random.default_rng(5)
    n = 50
    p, a, b, h = (rng.normal(0, 1.5, (n, 3)) for _ in range(4))
    b[:5] = p[:5] + 2.0 * (a[:5] - p[:5])  # B on the line P-A: no frame
    got, ok = frame_coordinates_many(p, a, b, h)
    assert not ok[:5].any() and ok[5:].sum() >= 40
    k = int(np.argmax(ok))  # one hydrogen at a time: the same flag and coordinates
    assert frame_coordinates(p[0], a[0], b[0], h[0]) is None
    np.testing.assert_allclose(frame_coordinates(p[k], a[k], b[k], h[k]), got[k], atol=1e-12)
    idx = jnp.arange(n, dtype=jnp.int32)
    r = Riding(parent=idx, ref_a=idx + n, ref_b=idx + 2 * n, local=jnp.asarray(got), b_factor=jnp.asarray(1.0),
               h_serial=idx)
    back = np.asarray(riding_xyz(jnp.asarray(np.concatenate([p, a, b])), r))
    np.testing.assert_allclose(back[ok], h[ok], atol=1e-10)


def test_refreshed_riding_follows_gemmi_on_new_coordinates():
    from jaxrefine.problem.riding import refreshed_riding

    m, s = _sites("5e5z")
    r = riding_from_sites(s, jnp.float64)
    moved = m.xyz_cart + np.random.default_rng(4).normal(0, 0.1, m.xyz_cart.shape)
    r2 = refreshed_riding(r, m, moved, monomer_dir())
    assert r2.parent is r.parent and r2.local.dtype == r.local.dtype
    h = np.asarray(riding_xyz(jnp.asarray(moved), r2))
    np.testing.assert_allclose(h, _placed_by_gemmi(riding_sites(m, monomer_dir(), xyz_cart=moved)), atol=PLACEMENT_TOL)


def test_riding_hydrogens_take_the_whole_adp_of_their_parent():
    """An anisotropic parent whose U is isotropic gives its hydrogens the same B as an isotropic one:
    F_calc with riding H agrees between ``refine.adp`` iso and aniso (5kzb has no ANISOU, so the
    anisotropic start is U = B/8π²·I).  Before the fix the H of anisotropic parents had B = 0 (and those
    of TLS parents only the residual B): the two differed by 14% of Σ|F|; now by 0.14%, the difference
    between the isotropic and the anisotropic spreading of the hydrogens (identical parameters; without
    hydrogens the two F_calc agree to 1e-15)."""
    from jaxrefine.config import load_config
    from jaxrefine.io.reflections import read_reflections
    from jaxrefine.problem import build_setup
    from jaxrefine.problem.xray_state import f_calc_of_jit

    model_path, data_path = dataset_paths("5kzb")
    m, refl = read_model(model_path, hydrogens=False), read_reflections(data_path)
    f = {}
    for adp in ("iso", "aniso"):
        cfg = load_config(None, [f"model.monlib={monomer_dir()}", "model.hydrogens=riding", f"refine.adp={adp}",
                                 "refine.precision=float64"])
        s = build_setup(None, None, cfg, model=m, refl=refl)
        assert s.problem.riding is not None and s.problem.riding.parent.shape[0] > 700
        f[adp] = np.asarray(f_calc_of_jit(s.params, s.problem))
    assert np.sum(np.abs(f["aniso"] - f["iso"])) / np.sum(np.abs(f["iso"])) < 5e-3


def test_stretched_peptides_get_one_amide_hydrogen():
    """5kzb shaken by 0.5 Å RMS has 5 peptide bonds beyond gemmi's link test (C–N > 2.01 Å).  Unlinked, gemmi read each
    N as a chain start and gave it three hydrogens (10 extra, fails before the fix); closed as for the restraints,
    the shaken model gets the deposited model's hydrogens, placed on the N where it is (not where the topology
    moved it)."""
    from jaxrefine.io.perturb import shake

    m, ref = _sites("5kzb")
    shaken = shake(m, 0.5, seed=7)
    s = riding_sites(shaken, monomer_dir())
    assert s.n == ref.n
    assert set(zip(s.parent.tolist(), s.atom_name.tolist())) == set(zip(ref.parent.tolist(), ref.atom_name.tolist()))
    h = np.asarray(riding_xyz(jnp.asarray(shaken.xyz_cart), riding_from_sites(s, jnp.float64)))
    assert np.abs(h - _placed_by_gemmi(s)).max() < PLACEMENT_TOL
    amide = np.asarray(s.atom_name == "H")
    d = np.linalg.norm(h[amide] - shaken.xyz_cart[s.parent[amide]], axis=1)
    assert amide.sum() > 90 and np.abs(d - np.median(d)).max() < 0.02  # every N–H at the library's distance


def test_refined_model_written_with_its_riding_hydrogens(tmp_path):
    """``output.hydrogens: write``: refined.cif carries the hydrogens the refinement rode (5e5z, 1.66 Å: riding
    by ``model.hydrogens: auto``), each at the library's distance from its parent with the parent's B, and
    ``rfactors`` with those hydrogens (the model's own) gives the R-free the refinement reported."""
    import json

    from jaxrefine.config import load_config
    from jaxrefine.io.reflections import read_reflections
    from jaxrefine.problem import build_setup
    from jaxrefine.problem.fmodel import fmodel_statistics
    from jaxrefine.refine.engine import refine
    from jaxrefine.refine.outputs import write_outputs

    model_path, data_path = dataset_paths("5e5z")
    cfg = load_config(None, [f"model.monlib={monomer_dir()}", "refine.n_cycles=1", "refine.steps_xyz=8",
                             "refine.steps_b=4", "output.hydrogens=write"])
    setup = build_setup(model_path, data_path, cfg)
    write_outputs(refine(setup), setup, tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["hydrogens"]["mode"] == "riding" and m["hydrogens"]["n_riding"] == 42
    back = read_model(tmp_path / "refined.cif", hydrogens=True)
    h = np.asarray(back.is_hydrogen, bool)
    assert h.sum() == 42 and (~h).sum() == 47
    d = np.linalg.norm(back.xyz_cart[h][:, None] - back.xyz_cart[~h][None], axis=2)
    near = d.argmin(1)
    assert np.all((d.min(1) > 0.85) & (d.min(1) < 1.15))  # X-H at the library's distances
    np.testing.assert_allclose(back.b_iso[h], back.b_iso[~h][near], atol=1e-3)  # the parent's B
    st = fmodel_statistics(back, read_reflections(data_path))
    assert abs(st["r_free"] - m["r_free"]) < 0.005, (st["r_free"], m["r_free"])

