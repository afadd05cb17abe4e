"""Foundation: reading models and reflections, crystal geometry, free flags, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import gemmi
import numpy as np
import pytest

from jaxrefine.core.crystal import centric_flags, epsilon_factors, orth_matrix, resolution_bins
from jaxrefine.errors import DataMismatchError, InputError, SelectionError
from jaxrefine.io.model import read_model
from jaxrefine.io.reflections import (
    check_compatible,
    detect_free_convention,
    generate_free_flags,
    read_reflections,
)
from jaxrefine.io.writers import protect, write_model, write_mtz

from conftest import dataset_paths


def test_model_counts_match_gemmi(dataset):
    pdb_id, model_path, _ = dataset
    st = gemmi.read_structure(str(model_path))
    model = read_model(model_path)
    assert model.n_atoms == st[0].count_atom_sites()
    assert model.n_residues == sum(len(ch) for ch in st[0])
    assert model.n_chains == len({ch.name for ch in st[0]})
    assert model.crystal.sg_number == st.find_spacegroup().number
    np.testing.assert_allclose(model.crystal.cell, st.cell.parameters)
    n_h = sum(a.is_hydrogen() for r in st[0].all() for a in [r.atom])
    assert int(model.is_hydrogen.sum()) == n_h
    no_h = read_model(model_path, hydrogens=False)
    assert no_h.n_atoms == model.n_atoms - n_h
    assert not no_h.is_hydrogen.any()
    # coordinates and B as gemmi reads them
    ref = np.array([a.atom.pos.tolist() for a in st[0].all()])
    np.testing.assert_allclose(model.xyz_cart, ref, atol=1e-6)


def test_reflections_match_gemmi(dataset):
    pdb_id, model_path, data_path = dataset
    refl = read_reflections(data_path)
    mtz = gemmi.read_mtz_file(str(data_path))
    assert refl.n + sum(refl.n_removed.values()) == mtz.nreflections
    free_col = refl.columns["FREE"]
    flags = np.array(mtz.column_with_label(free_col).array)
    # README: in every shared file the free set is flag 0
    assert refl.n_free == int(np.sum(flags[~np.isnan(np.array(mtz.column_with_label(refl.columns.get("F", refl.columns.get("I"))).array))] == 0))
    assert refl.free_convention.startswith("ccp4")
    # d-spacings as gemmi computes them
    np.testing.assert_allclose(refl.d, [mtz.cell.calculate_d(list(h)) for h in refl.hkl[:200]] + list(refl.d[200:]), rtol=1e-9)
    model = read_model(model_path)
    check_compatible(model.crystal, refl.crystal, str(model_path), str(data_path))
    assert np.all(refl.f_obs >= 0) and np.all(refl.sig_f_obs >= 0)


def test_french_wilson_on_1l2h_intensities():
    """1l2h has only IMEAN: amplitudes come from French–Wilson; strong reflections give F ≈ sqrt(I)."""
    _, data_path = dataset_paths("1l2h")
    refl = read_reflections(data_path)
    assert refl.from_intensities and refl.columns["I"] == "IMEAN"
    mtz = gemmi.read_mtz_file(str(data_path))
    i_obs = np.array(mtz.column_with_label("IMEAN").array)
    sig = np.array(mtz.column_with_label("SIGIMEAN").array)
    strong = (i_obs / sig > 10)
    # the file order is kept after cleaning (nothing removed in 1l2h)
    assert refl.n == len(i_obs)
    # strong data: F ≈ sqrt(I); the Wilson prior shrinks outliers slightly (French & Wilson 1978, h >> 1
    # limit F ≈ sqrt(I − σ²/εΣ)), so the typical deviation is tiny and the largest a few per cent
    rel = np.abs(refl.f_obs[strong] / np.sqrt(i_obs[strong]) - 1)
    assert np.median(rel) < 0.002 and rel.max() < 0.05
    weak = i_obs < 0
    assert weak.any() and np.all(refl.f_obs[weak] > 0)  # negative intensities get positive amplitudes


def test_french_wilson_posterior_matches_adaptive_quadrature():
    """E[F | I] and sd[F | I] against scipy's adaptive quadrature over J (an independent formulation: the centric
    prior's J^-1/2 singularity handled by quad's algebraic weight), strong, weak and negative intensities."""
    from scipy.integrate import quad

    from jaxrefine.io.french_wilson import posterior_amplitudes

    cases = [(i, s, big, c) for i, s in ((2500.0, 40.0), (300.0, 60.0), (20.0, 30.0), (-25.0, 30.0), (-90.0, 40.0))
             for big, c in ((400.0, False), (400.0, True), (60.0, False), (60.0, True))]
    i_obs, sig, sigma, centric = (np.array(v) for v in zip(*cases))
    f, sf = posterior_amplitudes(i_obs, sig, sigma, centric)
    for k, (i, s, big, c) in enumerate(cases):
        top = max(i, 0.0) + 12.0 * s

        def moment(power):
            like = lambda j: np.exp(-((i - j) ** 2) / (2 * s * s) + (i - max(i, 0.0)) ** 2 / (2 * s * s))  # noqa: E731
            if c:  # J^-1/2 exp(-J / 2Σ): the singular factor as quad's weight
                return quad(lambda j: j ** (power / 2) * like(j) * np.exp(-j / (2 * big)), 0.0, top,
                            weight="alg", wvar=(-0.5, 0.0), epsabs=0, epsrel=1e-12, limit=200)[0]
            return quad(lambda j: j ** (power / 2) * like(j) * np.exp(-j / big), 0.0, top, epsabs=0, epsrel=1e-12,
                        limit=200)[0]

        z, m1, m2 = moment(0), moment(1), moment(2)
        assert f[k] == pytest.approx(m1 / z, rel=1e-8), cases[k]
        assert sf[k] == pytest.approx(np.sqrt(m2 / z - (m1 / z) ** 2), rel=1e-6), cases[k]


def test_explicit_labin_intensity_and_amplitude():
    _, data_path = dataset_paths("5kzb")
    f = read_reflections(data_path, labin="FOBS,SIGFOBS,R-free-flags")
    i = read_reflections(data_path, labin="IOBS,SIGIOBS")
    assert not f.from_intensities and i.from_intensities
    assert np.array_equal(i.hkl, f.hkl)
    # French–Wilson amplitudes from IOBS agree with the deposited FOBS
    assert np.corrcoef(i.f_obs, f.f_obs)[0, 1] > 0.98
    with pytest.raises(InputError, match="5kzb.mtz.*'FP'.*not found"):
        read_reflections(data_path, labin="FP,SIGFP")


def test_sf_mmcif_reading_matches_mtz(tmp_path):
    _, data_path = dataset_paths("5e5z")
    mtz = gemmi.read_mtz_file(str(data_path))
    cif_path = tmp_path / "5e5z-sf.cif"
    conv = gemmi.MtzToCif()
    cif_path.write_text(conv.write_cif_to_string(mtz))
    a = read_reflections(data_path)
    b = read_reflections(cif_path)
    assert b.n == a.n and b.n_free == a.n_free
    order_a = np.lexsort(a.hkl.T)
    order_b = np.lexsort(b.hkl.T)
    np.testing.assert_allclose(a.f_obs[order_a], b.f_obs[order_b], rtol=1e-5)


def test_fractional_cartesian_round_trip(dataset):
    _, model_path, _ = dataset
    model = read_model(model_path)
    c = model.crystal
    np.testing.assert_allclose(c.to_cart(c.to_frac(model.xyz_cart)), model.xyz_cart, atol=1e-9)
    np.testing.assert_allclose(c.orth @ c.frac, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(orth_matrix(c.cell), c.orth, atol=1e-6)  # our formula vs gemmi's matrix
    assert c.volume == pytest.approx(gemmi.UnitCell(*c.cell).volume, rel=1e-9)


def test_crystal_symmetry_against_gemmi():
    for pid in ("5kzb", "5orl", "5e5z"):
        _, data_path = dataset_paths(pid)
        refl = read_reflections(data_path)
        mtz = gemmi.read_mtz_file(str(data_path))
        ops = mtz.spacegroup.operations()
        h = refl.hkl[:500]
        np.testing.assert_array_equal(centric_flags(h, refl.crystal), [ops.is_reflection_centric(list(x)) for x in h])
        np.testing.assert_array_equal(epsilon_factors(h, refl.crystal), [ops.epsilon_factor_without_centering(list(x)) for x in h])
        assert refl.crystal.n_ops == len(ops.sym_ops) * len(ops.cen_ops)


def test_resolution_bins_equal_count():
    d = np.linspace(1.5, 20, 1003)
    bins = resolution_bins(d, 10)
    counts = np.bincount(bins)
    assert len(counts) == 10 and counts.max() - counts.min() <= 1
    assert d[bins == 0].min() > d[bins == 9].max()  # bin 0 is low resolution


def test_generated_free_set_reproducible_and_fraction():
    rng = np.random.default_rng(1)
    hkl = rng.integers(-20, 20, size=(5000, 3))
    hkl = np.unique(hkl, axis=0)
    a = generate_free_flags(hkl, 0.05, seed=3)
    b = generate_free_flags(hkl[::-1], 0.05, seed=3)[::-1]  # file order does not matter
    assert np.array_equal(a, b)
    assert a.sum() == round(0.05 * len(hkl))
    c = generate_free_flags(hkl, 0.10, seed=3)
    assert c.sum() == round(0.10 * len(hkl))
    assert not np.array_equal(a, generate_free_flags(hkl, 0.05, seed=4))


def test_generated_free_set_when_file_has_none(tmp_path):
    _, data_path = dataset_paths("5e5z")
    refl = read_reflections(data_path)
    out = tmp_path / "noflags.mtz"
    write_mtz(out, refl.crystal, refl.hkl, {"FP": ("F", refl.f_obs), "SIGFP": ("Q", refl.sig_f_obs)})
    r2 = read_reflections(out, free_fraction=0.1, free_seed=5)
    assert r2.free_convention.startswith("generated")
    assert r2.n_free == round(0.1 * r2.n)


def test_free_convention_detection():
    ccp4 = np.array([0, 1, 2, 3, 4, 5, 0, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19], float)
    free, conv = detect_free_convention(ccp4)
    assert conv.startswith("ccp4") and free.sum() == 2
    phenix = np.array([0] * 19 + [1], float)
    free, conv = detect_free_convention(phenix)
    assert conv.startswith("phenix") and free.sum() == 1
    free, conv = detect_free_convention(phenix, free_value=0)
    assert free.sum() == 19


def test_selections():
    model_path, _ = dataset_paths("5orl")
    m = read_model(model_path)
    assert m.select("water").sum() == np.sum(m.res_name == "HOH")
    assert m.select("ligand").any() and set(m.res_name[m.select("ligand")]) >= {"ADP", "A4W"}
    ca = m.select("protein and name CA")
    assert ca.sum() == len(set(zip(m.chain_id[ca], m.res_seq[ca], m.altloc[ca])))
    seg = m.select("A/150-160")
    assert set(m.res_seq[seg]) == set(range(150, 161)) & set(m.res_seq)
    assert np.array_equal(m.select("chain A and resseq 150-160"), seg)
    assert (m.select("not water") == ~m.select("water")).all()
    with pytest.raises(SelectionError, match="5orl.*selects no atoms"):
        m.select("chain Z")
    with pytest.raises(SelectionError, match="cannot parse"):
        m.select("frobnicate the atoms")
    sub = m.subset(m.select("protein"))
    assert sub.n_atoms == int(m.select("protein").sum()) and sub.structure[0].count_atom_sites() == sub.n_atoms


def test_bad_input_errors(tmp_path):
    with pytest.raises(InputError, match="nothere.pdb: model file not found"):
        read_model(tmp_path / "nothere.pdb")
    with pytest.raises(InputError, match="nothere.mtz: reflection file not found"):
        read_reflections(tmp_path / "nothere.mtz")
    junk = tmp_path / "junk.mtz"
    junk.write_text("not an mtz")
    with pytest.raises(InputError, match="junk.mtz: cannot read"):
        read_reflections(junk)
    # an MTZ with only a free-flag column: no amplitudes
    _, data_path = dataset_paths("5e5z")
    refl = read_reflections(data_path)
    only_free = tmp_path / "only_free.mtz"
    write_mtz(only_free, refl.crystal, refl.hkl, {"FREE": ("I", refl.free.astype(float))})
    with pytest.raises(InputError, match="only_free.mtz: no amplitude or intensity column.*FREE"):
        read_reflections(only_free)
    # model without a space group
    nosym = tmp_path / "nosym.pdb"
    nosym.write_text("ATOM      1  CA  ALA A   1       0.000   0.000   0.000  1.00 10.00           C\nEND\n")
    with pytest.raises(InputError, match="nosym.pdb: .*(space group|unit cell)"):
        read_model(nosym)


def test_cell_and_space_group_mismatch():
    m1, _ = dataset_paths("5orl")
    _, d2 = dataset_paths("4xof")
    _, d3 = dataset_paths("4iid")
    model = read_model(m1)
    with pytest.raises(DataMismatchError, match="space groups differ"):
        check_compatible(model.crystal, read_reflections(d2).crystal, str(m1), str(d2))
    m4, _ = dataset_paths("4xof")
    with pytest.raises(DataMismatchError, match="4xof.pdb.gz cell .* and .*4iid.mtz cell .* differ"):
        check_compatible(read_model(m4).crystal, read_reflections(d3).crystal, str(m4), str(d3))


def test_writers_round_trip_and_never_overwrite_inputs(tmp_path):
    model_path, data_path = dataset_paths("5orl")
    m = read_model(model_path, hydrogens=False)
    shifted = m.xyz_cart + np.array([0.1, -0.2, 0.3])
    new_b = m.b_iso + 1.0
    for name in ("out.cif", "out.pdb"):
        write_model(m, tmp_path / name, xyz_cart=shifted, b_iso=new_b, remarks={"r_work": 0.2, "r_free": 0.25, "d_min": 1.69})
        back = read_model(tmp_path / name)
        np.testing.assert_allclose(back.xyz_cart, shifted, atol=1e-3)
        np.testing.assert_allclose(back.b_iso, new_b, atol=0.01)
        assert list(back.atom_name) == list(m.atom_name) and list(back.res_name) == list(m.res_name)
    assert "JAXREFINE" in (tmp_path / "out.pdb").read_text()
    assert read_model(tmp_path / "out.cif").meta["r_free"] == pytest.approx(0.25)
    protect(model_path)
    with pytest.raises(InputError, match="refusing to overwrite an input"):
        write_model(m, model_path)
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary files left


def test_cli_info_json():
    model_path, data_path = dataset_paths("4xof")
    out = subprocess.run(
        [sys.executable, "-m", "jaxrefine.cli", "info", str(model_path), str(data_path), "--json"],
        capture_output=True, text=True, check=True,
    )
    info = json.loads(out.stdout)
    st = gemmi.read_structure(str(model_path))
    assert info["n_atoms"] == st[0].count_atom_sites() == 1492
    assert info["n_residues"] == 197 and info["n_chains"] == 1
    assert info["space_group"] == "P 21 21 21"
    assert info["cell"] == pytest.approx([27.94, 43.30, 50.19, 90, 90, 90])
    assert info["n_reflections"] == 22230 and info["n_free"] == 1112
    assert info["d_min"] == pytest.approx(1.15, abs=0.01) and info["d_max"] == pytest.approx(32.79, abs=0.01)
    assert info["columns"]["F"] == "FP" and info["free_convention"].startswith("ccp4")


def test_cli_info_error_names_file(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "jaxrefine.cli", "info", str(tmp_path / "missing.cif")], capture_output=True, text=True
    )
    assert out.returncode == 1 and "missing.cif: model file not found" in out.stderr


def test_console_exit_is_quick_only_when_nothing_else_runs(monkeypatch):
    """``jaxrefine`` (console_main) ends with os._exit and main's status once the streams are flushed, skipping
    Python's slow finalisation of JAX; with another thread or a child process still alive it takes the normal
    exit instead.  (The test process has threads of its own, so the thread count is set here.)"""
    import multiprocessing
    import threading

    from jaxrefine import cli

    class Quick(Exception):
        pass

    def fake_exit(status):
        raise Quick(status)

    monkeypatch.setattr(cli, "main", lambda: 3)
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setattr(cli.logging, "shutdown", lambda: None)  # leave pytest's log handlers open
    monkeypatch.setattr(multiprocessing, "active_children", lambda: [])
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    with pytest.raises(Quick) as quick:
        cli.console_main()
    assert quick.value.args == (3,)
    for threads, children in ((2, []), (1, ["a Dask worker"])):
        monkeypatch.setattr(threading, "active_count", lambda n=threads: n)
        monkeypatch.setattr(multiprocessing, "active_children", lambda c=children: c)
        with pytest.raises(SystemExit) as normal:
            cli.console_main()
        assert normal.value.code == 3
