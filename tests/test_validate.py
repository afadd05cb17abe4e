"""Validation tools: map sampling, per-residue fit, register-shift scan, omit maps, water picking.

Real-data tests are marked slow; each computes one or two σA-weighted maps (~10–30 s each on
2 cores, mostly F_calc compilation), so the module is kept to a handful of map calculations.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import dataset_paths
from jaxrefine.core.crystal import Crystal
from jaxrefine.io.model import read_model
from jaxrefine.io.reflections import read_reflections

# ---------------------------------------------------------------------------- tolerances
TOL_GRID_EXACT = 1e-12  # interpolation at grid points returns the grid value (float64 round-off)
TOL_TRICUBIC = 2e-3  # tricubic (O(h³)) error on the same smooth function: ~10x below trilinear
TOL_TRILINEAR = 4e-2  # trilinear bound h²/8·Σ|∂²f| ≈ 0.03 for this function (h = 1/24..1/36)
TOL_INTEGRAL = 1e-3  # a Gaussian atom summed on a 0.2 Å grid integrates to its weight
RSCC_GOOD_MODEL = 0.7  # issue 9: mean protein RSCC of a deposited model
RSCC_DISPLACED = 0.5  # a residue moved 2.5 Å off its density (maps phased by the moved model)
OMIT_CC = 0.5  # issue 9: omit map vs calculated density of the omitted atoms
OMIT_SIGMA = 2.0  # mean mFo−DFc (σ) at the omitted atoms: clearly positive density
WATER_RECOVERED = 0.5  # issue 9: ≥ half of the removed waters found again within 0.5 Å
WATER_FALSE = 0.2  # issue 9: < 20 % of the added waters are not near a removed one
WATER_MATCH = 0.5  # Å
WATER_BAD_DEPOSITED = 0.02  # at most 2 % of a deposited model's waters fail the removal criteria


def _p1_crystal(a=20.0, b=24.0, c=30.0, beta=100.0):
    from jaxrefine.core.crystal import orth_matrix

    cell = np.array([a, b, c, 90.0, beta, 90.0])
    orth = orth_matrix(cell)
    return Crystal(cell=cell, space_group="P 1", sg_number=1, rot=np.eye(3)[None], trans=np.zeros((1, 3)),
                   n_primitive_ops=1, orth=orth, frac=np.linalg.inv(orth))


# ------------------------------------------------------------------------------- unit tests


def test_sample_map_exact_at_grid_points_and_smooth_error():
    from jaxrefine.validate.density import sample_map

    shape = (24, 30, 36)
    g = np.stack(np.meshgrid(*[np.arange(n) / n for n in shape], indexing="ij"), -1)

    def f(x):  # smooth periodic test function
        return np.cos(2 * np.pi * x[..., 0]) * np.sin(2 * np.pi * (x[..., 1] + 2 * x[..., 2])) + 0.3 * np.cos(2 * np.pi * x[..., 2])

    values = f(g)
    rng = np.random.default_rng(0)
    at_grid = np.array([[3, 7, 11], [0, 29, 35], [23, 0, 5]]) / np.array(shape)
    for order in (1, 3):
        np.testing.assert_allclose(sample_map(values, at_grid + 1.0, order), f(at_grid), atol=TOL_GRID_EXACT)
    pts = rng.uniform(-1, 2, size=(200, 3))
    assert np.abs(sample_map(values, pts, 3) - f(pts)).max() < TOL_TRICUBIC
    assert np.abs(sample_map(values, pts, 1) - f(pts)).max() < TOL_TRILINEAR


def test_calc_density_integrates_to_weight_and_grid_points_match_brute_force():
    from jaxrefine.validate.density import calc_density, grid_points_near

    crystal = _p1_crystal()
    xyz = np.array([[5.0, 6.0, 7.0]])
    shape = (100, 120, 150)  # ~0.2 Å spacing
    idx, pts = grid_points_near(xyz, crystal, shape, 4.0)
    rho = calc_density(pts, xyz, np.array([8.0]), np.array([20.0]), d_min=2.0, cutoff=4.0)
    voxel = crystal.volume / np.prod(shape)
    assert abs(rho.sum() * voxel - 8.0) < TOL_INTEGRAL * 8.0 * 10  # the 4 Å cut loses ~1e-2 of the tail
    # brute force: every grid point of the cell (with its nearest periodic image) within 2 Å
    small = (20, 24, 30)
    idx2, _ = grid_points_near(xyz, crystal, small, 2.0)
    g = np.stack(np.meshgrid(*[np.arange(n) for n in small], indexing="ij"), -1).reshape(-1, 3)
    f = g / np.array(small) - crystal.to_frac(xyz)
    f -= np.rint(f)
    d = np.linalg.norm(crystal.to_cart(f), axis=1)
    brute = {tuple(v) for v in g[d <= 2.0]}
    assert {tuple(v) for v in idx2 % np.array(small)} == brute


def test_transplant_onto_itself_is_identity_and_frames_are_orthonormal():
    from jaxrefine.validate.register import residue_frames, transplant

    model = read_model(dataset_paths("5kzb")[0], hydrogens=False)
    frames = residue_frames(model)
    ri = frames.segments[0][1][10]
    np.testing.assert_allclose(transplant(model, frames, ri, ri), model.xyz_cart[frames.side[ri]], atol=1e-9)
    np.testing.assert_allclose(frames.axes[ri].T @ frames.axes[ri], np.eye(3), atol=1e-12)


def test_apply_register_shift_moves_names_and_keeps_backbone():
    from jaxrefine.validate.register import apply_register_shift

    model = read_model(dataset_paths("5kzb")[0], hydrogens=False)
    shifted = apply_register_shift(model, "A", 40, 49, 1)
    names = {int(s): str(n) for s, n in zip(model.res_seq, model.res_name)}
    new = {int(s): str(n) for s, n in zip(shifted.res_seq, shifted.res_name)}
    assert all(new[i] == names[i + 1] for i in range(40, 50))
    assert new[39] == names[39] and new[50] == names[50]
    for s in (40, 45, 49):
        for atom in ("N", "CA", "C"):
            a = model.xyz_cart[(model.res_seq == s) & (model.atom_name == atom) & (model.chain_id == "A")][0]
            b = shifted.xyz_cart[(shifted.res_seq == s) & (shifted.atom_name == atom) & (shifted.chain_id == "A")][0]
            np.testing.assert_allclose(a, b, atol=1e-3)
        # the transplanted CB sits at the usual 1.53 Å from CA (Engh & Huber 1991) unless the donor is Gly
        if names[s + 1] != "GLY":
            ca = shifted.xyz_cart[(shifted.res_seq == s) & (shifted.atom_name == "CA")][0]
            cb = shifted.xyz_cart[(shifted.res_seq == s) & (shifted.atom_name == "CB")][0]
            assert abs(np.linalg.norm(cb - ca) - 1.53) < 0.05


# ------------------------------------------------------------------------------ real data


def _load(pdb_id):
    mp, dp = dataset_paths(pdb_id)
    return read_model(mp, hydrogens=False), read_reflections(dp)


def _overlaps(flag, chain, start, end):
    return flag["chain"] == chain and flag["start"] <= end and flag["end"] >= start


@pytest.mark.slow
@pytest.mark.parametrize("pdb_id, chain, start, end, check_clean", [("1l2h", "A", 100, 109, True), ("5kzb", "A", 40, 49, False)])
def test_register_shift_flagged(pdb_id, chain, start, end, check_clean):
    """1l2h at 1.54 Å and 5kzb at 3.2 Å: a 1-residue shift of 10 residues is flagged there, and only
    there, with shift −1 (which restores the sequence); the deposited 1l2h model has no flag.  The
    deposited 5kzb model, the closest to the threshold of the seven (ΔCC +0.05), is checked unflagged
    through the CLI below; the other deposited models are in the calibration table of the issue-9
    report (4iid alone takes ~4 min)."""
    from jaxrefine.validate.register import apply_register_shift, register_maps, scan_register

    model, refl = _load(pdb_id)
    if check_clean:
        clean = scan_register(model, register_maps(model, refl))
        assert clean.flags == [], clean.flags
    shifted = apply_register_shift(model, chain, start, end, 1)
    scan = scan_register(shifted, register_maps(shifted, refl))
    hits = [f for f in scan.flags if _overlaps(f, chain, start, end)]
    assert hits and all(f["shift"] == -1 for f in hits), scan.flags
    assert all(_overlaps(f, chain, start - 9, end + 9) for f in scan.flags), scan.flags


@pytest.mark.slow
def test_validate_cli_json_keys_and_rscc(capsys, tmp_path):
    from jaxrefine.cli import main

    mp, dp = dataset_paths("5kzb")
    assert main(["validate", str(mp), str(dp), "--json", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["register_shifts"] == []
    assert {"chain", "seq", "name", "rscc"} <= set(out["residues"][0])
    prot = [r["rscc"] for r in out["residues"] if r["kind"] == "protein"]
    assert len(prot) == 104 and np.mean(prot) > RSCC_GOOD_MODEL
    assert (tmp_path / "residues.csv").read_text().count("\n") == len(out["residues"]) + 1
    assert (tmp_path / "rscc.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def maps_1l2h():
    from jaxrefine.validate.density import model_maps

    model, refl = _load("1l2h")
    return model, refl, model_maps(model, refl)


def test_water_check_maps_skip_only_the_difference_map(maps_1l2h):
    """maps_of_f_model(difference=False), as the water check after each macrocycle calls it: the same
    2mFo−DFc map and σ as with the difference map, and no difference map."""
    from jaxrefine.validate.density import maps_of_f_model

    _, refl, maps = maps_1l2h
    full = maps_of_f_model(refl, maps.fmodel.f_model, maps.fmodel.sigma_a)
    lean = maps_of_f_model(refl, maps.fmodel.f_model, maps.fmodel.sigma_a, difference=False)
    assert lean.fofc is None and full.fofc.shape == full.two_fofc.shape
    np.testing.assert_array_equal(lean.two_fofc, full.two_fofc)
    assert lean.sigma_two == full.sigma_two > 0


@pytest.mark.slow
def test_displaced_residues_have_low_rscc(maps_1l2h):
    """Residues moved 2.5 Å off the density of the deposited model's map get RSCC < 0.5; the rest stay good.
    (With maps phased by the moved model itself, model bias keeps their RSCC at 0.75–0.88, but their
    mFo−DFc minimum is −6 to −10 σ: see the report of issue 9.)"""
    from jaxrefine.io.build import with_coordinates
    from jaxrefine.validate.density import residue_fit

    model, _, maps = maps_1l2h
    moved_res = (20, 60, 100)
    xyz = model.xyz_cart.copy()
    for s in moved_res:
        xyz[(model.res_seq == s) & (model.kind == "protein")] += np.array([2.5, 0.0, 0.0])
    base = {r["seq"]: r for r in residue_fit(model, maps) if r["kind"] == "protein"}
    moved = {r["seq"]: r for r in residue_fit(with_coordinates(model, xyz_cart=xyz), maps) if r["kind"] == "protein"}
    assert np.mean([r["rscc"] for r in base.values()]) > RSCC_GOOD_MODEL
    for s in moved_res:
        assert base[s]["rscc"] > RSCC_GOOD_MODEL and moved[s]["rscc"] < RSCC_DISPLACED


@pytest.mark.slow
def test_omit_map_of_ligand_shows_its_density(tmp_path, capsys):
    """5orl: omitting ADP (through the CLI) leaves strong positive mFo−DFc at its atoms that correlates
    > 0.5 with their calculated density; the same atoms moved 4 Å into other density do not."""
    from jaxrefine.cli import main
    from jaxrefine.validate.density import region_correlation

    mp, dp = dataset_paths("5orl")
    assert main(["omit", str(mp), str(dp), "--select", "resname ADP", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n_omitted"] == 27
    assert out["cc_fofc"] > OMIT_CC and out["mean_fofc_sigma"] > OMIT_SIGMA
    assert (tmp_path / "omit.mtz").stat().st_size > 0 and (tmp_path / "omit_fofc.ccp4").stat().st_size > 0
    # negative control on the written map: the ligand displaced 4 Å does not fit the omit density
    from jaxrefine.io.maps_grid import read_ccp4_map_values

    model = read_model(mp, hydrogens=False)
    sel = model.res_name == "ADP"
    fofc = read_ccp4_map_values(tmp_path / "omit_fofc.ccp4")
    cc, _ = region_correlation(fofc, model.xyz_cart[sel], model.atomic_number[sel] * model.occ[sel],
                               model.b_iso[sel], model.crystal, out["d_min"])
    assert abs(cc - out["cc_fofc"]) < 0.02  # the file holds the map the CLI scored
    cc_off, _ = region_correlation(fofc, model.xyz_cart[sel] + np.array([4.0, 0.0, 0.0]),
                                   model.atomic_number[sel] * model.occ[sel], model.b_iso[sel], model.crystal, out["d_min"])
    assert cc_off < OMIT_CC


@pytest.mark.slow
def test_water_picking_recovers_removed_waters():
    """4xof (1.15 Å): remove a third of the waters (seeded), pick mFo−DFc peaks of the rest's map:
    ≥ half of the removed waters come back within 0.5 Å (symmetry copies considered) and < 20 % of the
    added waters are not at a removed one; bad-water removal flags a water put in empty solvent, a
    clashing one and one with B = 150 Å², and none of the deposited waters kept."""
    from jaxrefine.io.build import with_coordinates
    from jaxrefine.validate.density import model_maps, sample_map
    from jaxrefine.validate.waters import bad_waters, nearest_distance, pick_waters

    model, refl = _load("4xof")
    water_res = np.unique(model.res_index[model.kind == "water"])
    drop = np.random.default_rng(0).choice(water_res, size=len(water_res) // 3, replace=False)
    dropped = np.isin(model.res_index, drop)
    rest = model.subset(~dropped)
    removed = model.xyz_cart[dropped & (model.element == "O")]
    maps = model_maps(rest, refl)
    new, heights = pick_waters(rest, maps)
    d_removed = nearest_distance(removed, new, model.crystal, 3.0)
    d_new = nearest_distance(new, removed, model.crystal, 3.0)
    assert np.mean(d_removed < WATER_MATCH) >= WATER_RECOVERED, (np.sum(d_removed < WATER_MATCH), len(removed))
    assert len(new) > 0 and np.mean(d_new > WATER_MATCH) < WATER_FALSE, (np.sum(d_new > WATER_MATCH), len(new))
    assert heights.min() >= 3.5
    # removal criteria: almost all deposited waters pass (4xof has a 0.39-occupancy water in no
    # density, rightly flagged); three spoiled ones are flagged
    base = set(np.nonzero(bad_waters(rest, maps))[0])
    assert len(base) <= WATER_BAD_DEPOSITED * np.sum(rest.kind == "water")
    w = [i for i in np.nonzero(rest.kind == "water")[0] if i not in base][:3]
    rng = np.random.default_rng(1)
    cand = rest.crystal.to_cart(rng.uniform(0, 1, (4000, 3)))
    far = nearest_distance(cand, rest.xyz_cart, rest.crystal, 4.0) > 4.0
    low = sample_map(maps.two_fofc, rest.crystal.to_frac(cand)) / maps.sigma_two < 0.0
    empty = cand[far & low][0]
    protein_atom = rest.xyz_cart[np.nonzero(rest.kind == "protein")[0][50]]
    xyz, b = rest.xyz_cart.copy(), rest.b_iso.copy()
    xyz[w[0]] = empty
    xyz[w[1]] = protein_atom + np.array([1.0, 0.0, 0.0])
    b[w[2]] = 150.0
    bad = bad_waters(with_coordinates(rest, xyz_cart=xyz, b_iso=b), maps)
    assert set(np.nonzero(bad)[0]) == base | set(w)
    # one round of update_waters on the same maps: bad ones out, picked ones in as HOH residues
    from jaxrefine.validate.waters import update_waters

    upd = update_waters(rest, refl, maps=maps)
    n_before = len(np.unique(rest.res_index[rest.kind == "water"]))
    n_after = len(np.unique(upd.model.res_index[upd.model.kind == "water"]))
    assert upd.removed == len({rest.res_index[i] for i in base}) and upd.report["added"] == len(new)
    assert n_after == n_before - upd.removed + len(new)
    added = upd.model.xyz_cart[upd.model.chain_id == upd.model.chain_id[-1]]
    np.testing.assert_allclose(added, new, atol=1e-3)  # PDB precision of the written coordinates


@pytest.mark.slow
def test_water_picking_fills_spare_slots(caplog):
    """4xof (1.15 Å) with a third of its waters removed, refined 2 cycles with water picking: the picked waters
    go into the setup's occupancy-0 slots (the problem keeps every shape: no rebuild, no compiling again), most
    of them where a removed water was; the slots stay out of the non-bonded list until filled and out of the
    refined model when empty, and the new waters are in it with occupancy 1."""
    import logging

    from jaxrefine.config import load_config
    from jaxrefine.problem.setup import build_setup, spare_water_count
    from jaxrefine.refine.engine import refine, refined_model
    from jaxrefine.validate.waters import nearest_distance, water_hooks

    model, refl = _load("4xof")
    water_res = np.unique(model.res_index[model.kind == "water"])
    drop = np.random.default_rng(0).choice(water_res, size=len(water_res) // 3, replace=False)
    dropped = np.isin(model.res_index, drop)
    rest = model.subset(~dropped)
    cfg = load_config(None, ["refine.n_cycles=2", "waters.update_waters=true", "refine.adp=iso",
                             "model.hydrogens=remove"])
    setup = build_setup(None, None, cfg, model=rest, refl=refl)
    spare = setup.spare_waters
    k = spare_water_count(rest)
    assert spare is not None and spare.sum() == k and setup.model.n_atoms == rest.n_atoms + k
    assert np.all(setup.model.occ[spare] == 0) and np.all(np.asarray(setup.problem.maps.occ0)[spare] == 0)
    listed = np.unique(np.concatenate([np.asarray(setup.state.nonbonded.i), np.asarray(setup.state.nonbonded.j)]))
    assert not np.isin(np.nonzero(spare)[0], listed).any()  # all at the model's centre, yet no clash listed
    with caplog.at_level(logging.INFO, logger="jaxrefine"):
        res = refine(setup, **water_hooks(cfg))
    assert not any("rebuilt" in r.getMessage() for r in caplog.records)
    assert res.setup is not setup and res.params.xyz_frac.shape == setup.params.xyz_frac.shape
    filled = spare & (np.asarray(res.problem.maps.occ0) > 0)
    assert 0 < filled.sum() < k and np.all(res.setup.model.occ[filled] == 1)
    listed = np.concatenate([np.asarray(res.state.nonbonded.i), np.asarray(res.state.nonbonded.j)])
    assert not np.isin(np.nonzero(spare & ~filled)[0], listed).any()
    out = refined_model(res)
    assert out.n_atoms == setup.model.n_atoms - (spare & ~filled).sum() - int(res.removed_atoms[~spare].sum())
    assert np.all(out.occ[out.kind == "water"] > 0)
    new = out.xyz_cart[np.isin(out.chain_id, np.unique(setup.model.chain_id[spare]))]
    assert len(new) == filled.sum()
    removed = model.xyz_cart[dropped & (model.element == "O")]
    d_new = nearest_distance(new, removed, model.crystal, 3.0)
    assert np.mean(d_new < WATER_MATCH) > 1 - WATER_FALSE, d_new


@pytest.mark.slow
def test_water_picking_rebuilds_when_the_slots_run_out(monkeypatch, caplog):
    """With one slot and more waters picked (4xof without a third of its waters), the round rebuilds the problem
    for the new atoms (the way before the slots), and the new setup has slots again, counted for the new model."""
    import logging

    import jaxrefine.problem.setup as setup_module
    from jaxrefine.config import load_config
    from jaxrefine.refine.engine import refine, refined_model
    from jaxrefine.validate.waters import water_hooks

    model, refl = _load("4xof")
    water_res = np.unique(model.res_index[model.kind == "water"])
    drop = np.random.default_rng(0).choice(water_res, size=len(water_res) // 3, replace=False)
    rest = model.subset(~np.isin(model.res_index, drop))
    monkeypatch.setattr(setup_module, "SPARE_WATER_MIN", 1)
    monkeypatch.setattr(setup_module, "SPARE_WATER_FRACTION", 0.0)
    cfg = load_config(None, ["refine.n_cycles=2", "waters.update_waters=true", "refine.adp=iso",
                             "model.hydrogens=remove"])
    setup = setup_module.build_setup(None, None, cfg, model=rest, refl=refl)
    assert setup.spare_waters.sum() == 1
    with caplog.at_level(logging.INFO, logger="jaxrefine"):
        res = refine(setup, **water_hooks(cfg))
    assert any("1 spare slots: the problem is rebuilt" in r.getMessage() for r in caplog.records)
    n_new = res.setup.model.n_atoms - res.setup.spare_waters.sum()
    assert n_new > rest.n_atoms and res.params.xyz_frac.shape[0] == res.setup.model.n_atoms
    assert res.setup.spare_waters.sum() == 1 and np.all(res.setup.model.occ[res.setup.spare_waters] == 0)
    out = refined_model(res)
    assert out.n_atoms == n_new - int(res.removed_atoms[~res.setup.spare_waters].sum())
    assert np.all(out.occ[out.kind == "water"] > 0)


@pytest.mark.slow
def test_metal_coordinating_waters_are_not_clashes():
    """5orl: the six waters that coordinate its two Mg ions (2.05-2.21 Å) are not flagged as clashes
    (they were removed from a shaken start, costing 0.009 in R-free), while a water moved to 1.6 Å
    of the Mg is."""
    from jaxrefine.io.build import with_coordinates
    from jaxrefine.io.model import metal_atoms
    from jaxrefine.validate.density import model_maps
    from jaxrefine.validate.waters import bad_waters, nearest_distance

    assert list(metal_atoms(np.array(["MG", "Zn", "C", "O", "CL", "Fe"]))) == [True, True, False, False, False, True]
    model, refl = _load("5orl")
    maps = model_maps(model, refl)
    mg = model.xyz_cart[model.element == "Mg"]
    water = np.nonzero((model.kind == "water") & (model.element == "O"))[0]
    bound = water[nearest_distance(model.xyz_cart[water], mg, model.crystal, 2.5) < 2.5]
    assert len(bound) == 6
    assert not bad_waters(model, maps)[bound].any()
    xyz = model.xyz_cart.copy()
    to_mg = xyz[bound[0]] - mg[np.argmin(np.linalg.norm(mg - xyz[bound[0]], axis=1))]
    xyz[bound[0]] -= to_mg * (1.0 - 1.6 / np.linalg.norm(to_mg))
    assert bad_waters(with_coordinates(model, xyz_cart=xyz), maps)[bound[0]]


@pytest.mark.parametrize("pdb_id", ["5kzb", "1l2h"])
def test_nearest_distance_matches_gemmi_images(pdb_id):
    """nearest_distance (points carried by the inverse operators) equals the smallest distance over every
    symmetry image that gemmi's UnitCell.find_nearest_image finds, for waters against the macromolecule
    (5kzb: I 41 2 2, 16 operators with centring; 1l2h: P 43, where three waters' nearest contact is a
    symmetry copy)."""
    import gemmi

    from jaxrefine.validate.waters import nearest_distance

    model = read_model(dataset_paths(pdb_id)[0], hydrogens=False)
    water = np.nonzero(model.kind == "water")[0]
    atoms = model.xyz_cart[model.kind != "water"]
    cutoff = 4.0
    got = nearest_distance(model.xyz_cart[water], atoms, model.crystal, cutoff)
    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(*model.crystal.cell)
    st.spacegroup_hm = model.crystal.space_group
    st.setup_cell_images()
    cell = st.cell
    want = np.array([min(cell.find_nearest_image(gemmi.Position(*p), gemmi.Position(*a), gemmi.Asu.Any).dist()
                         for a in atoms) for p in model.xyz_cart[water]])
    want = np.where(want < cutoff, want, np.inf)
    assert np.isfinite(want).sum() >= 6  # the check compares real contacts
    np.testing.assert_allclose(got, want, atol=1e-6)
    direct = np.linalg.norm(model.xyz_cart[water][:, None] - atoms[None], axis=-1).min(1)
    assert np.sum(want < direct - 1e-3) == {"5kzb": 0, "1l2h": 3}[pdb_id]  # contacts with symmetry copies


def test_water_hooks_follow_the_config():
    """The water actions handed to the refinement loop are those the config asks for (issue 13:
    refine never imports validate; the caller passes them)."""
    from jaxrefine.config import load_config
    from jaxrefine.validate.waters import water_hooks

    default = water_hooks(load_config(None))
    assert len(default["after_minimise"]) == 1 and default["between_cycles"] == []
    picking = water_hooks(load_config(None, ["waters.update_waters=true", "waters.remove_bad=false"]))
    assert picking["after_minimise"] == [] and len(picking["between_cycles"]) == 1


def test_water_actions_stop_at_low_resolution(caplog):
    """Waters are removed or picked only with data to waters.max_d_min (2.8 Å, phenix's ordered-solvent limit)
    or better: at 3.2 Å both hooks hand the cycle back untouched and say why once."""
    import logging
    from types import SimpleNamespace

    from jaxrefine.config import WaterConfig, load_config
    from jaxrefine.validate.waters import water_hooks, waters_apply

    def ctx(d_min, cycle=1):
        setup = SimpleNamespace(refl=SimpleNamespace(d_min=d_min), model=SimpleNamespace(kind=np.array(["water"])))
        return SimpleNamespace(setup=setup, problem=None, params=None, blocks=("xyz", "b"), cycle=cycle, last=False)

    w = WaterConfig()
    assert w.max_d_min == 2.8 and waters_apply(ctx(2.8), w) and waters_apply(ctx(1.2), w)
    hooks = water_hooks(load_config(None, ["waters.update_waters=true"]))
    remove_bad, pick = hooks["after_minimise"][0], hooks["between_cycles"][0]
    with caplog.at_level(logging.INFO, logger="jaxrefine"):
        for cycle in (1, 2):
            c = ctx(3.2, cycle)
            assert remove_bad(c) is c and pick(c) is c
    said = [r.getMessage() for r in caplog.records if "waters kept as they are" in r.getMessage()]
    assert len(said) == 1 and "3.20" in said[0]  # said once for both actions and all cycles
    assert not waters_apply(ctx(2.9), WaterConfig()) and waters_apply(ctx(2.9), WaterConfig(max_d_min=3.0))


@pytest.mark.slow
def test_composite_omit_symmetry_images_match_the_map(maps_1l2h):
    """The grid images used to assemble a composite omit map are symmetry mates: an FFT map (gemmi,
    P43) has the same value at a point and at all its images."""
    from jaxrefine.validate.density import grid_points_near, map_values_at
    from jaxrefine.validate.omit import _symmetry_images_of_grid, split_pieces

    model, _, maps = maps_1l2h
    idx, _ = grid_points_near(model.xyz_cart[:50], maps.crystal, maps.two_fofc.shape, 1.5)
    images = _symmetry_images_of_grid(idx, maps.crystal, maps.two_fofc.shape)
    assert images.shape[0] == 4
    v = maps.two_fofc
    ref = map_values_at(v, idx)
    for g in images:
        np.testing.assert_allclose(v[g[:, 0], g[:, 1], g[:, 2]], ref, atol=1e-4 * np.abs(v).max())
    piece = split_pieces(model, 4)
    assert set(np.unique(piece)) == {0, 1, 2, 3} and np.all(np.diff(piece) >= 0)
    assert np.bincount(piece).min() > 0.15 * model.n_atoms
