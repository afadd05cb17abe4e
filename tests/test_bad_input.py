"""Bad input: every kind ends in one line naming the file or option and the problem, with exit
status 1 (2 for usage errors), no traceback, and no input or previous output changed.

The table runs the CLI in-process (``jaxrefine.cli.main``) on the 5e5z files (47 atoms); every
case fails before any refinement starts.  The few behaviours that need a run or a signal are
separate tests below.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gemmi
import numpy as np
import pytest

from conftest import REPO, dataset_paths
from jaxrefine.cli import main

OLD_RESULTS = {"refined.cif": "OLD MODEL\n", "metrics.json": '{"r_free": 0.3}\n', "maps.mtz": "OLD MAPS\n"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Plain copies of the 5e5z model (PDB text) and data (MTZ) plus the MTZ as gemmi reads it."""
    model_gz, data_gz = dataset_paths("5e5z")
    folder = tmp_path_factory.mktemp("inputs")
    (folder / "model.pdb").write_bytes(gzip.decompress(model_gz.read_bytes()))
    (folder / "data.mtz").write_bytes(gzip.decompress(data_gz.read_bytes()))
    return folder


def _atom_lines(text: str):
    return [i for i, ln in enumerate(text.splitlines(keepends=True)) if ln.startswith(("ATOM", "HETATM"))]


def _edit_atom(text: str, index: int, start: int, end: int, value: str) -> str:
    """Replace PDB columns [start, end) (0-based) of the index-th atom record."""
    lines = text.splitlines(keepends=True)
    i = _atom_lines(text)[index]
    ln = lines[i]
    lines[i] = ln[:start] + value.rjust(end - start)[: end - start] + ln[end:]
    return "".join(lines)


def _every_atom(text: str, start: int, end: int, value: str) -> str:
    for k in range(len(_atom_lines(text))):
        text = _edit_atom(text, k, start, end, value)
    return text


def _model(tmp, base, edit, name="bad.pdb"):
    path = tmp / name
    path.write_text(edit((base / "model.pdb").read_text()))
    return path


def _mtz(tmp, base, edit, name="bad.mtz"):
    mtz = gemmi.read_mtz_file(str(base / "data.mtz"))
    edit(mtz)
    path = tmp / name
    mtz.write_to_file(str(path))
    return path


def _set_column(mtz, label, fn):
    data = np.array(mtz, copy=True)
    i = mtz.column_labels().index(label)
    data[:, i] = fn(data[:, i], data)
    mtz.set_data(data)


def _huge_hkl(mtz):
    data = np.array(mtz, copy=True)
    data[0, :3] = (400, 0, 1)  # d = 0.02 Å for this 9.6 Å cell
    mtz.set_data(data)


def refine(tmp, base, *extra, model=None, data=None):
    return ["refine", str(model or base / "model.pdb"), str(data or base / "data.mtz"), "--out", str(tmp / "prev"), *extra]


def _yaml(tmp, text):
    path = tmp / "cfg.yaml"
    path.write_text(text)
    return str(path)


def _duplicate_atom(text):
    lines = text.splitlines(keepends=True)
    i = _atom_lines(text)[4]
    return "".join(lines[: i + 1] + [lines[i]] + lines[i + 1:])


def _truncate(text):
    lines = text.splitlines(keepends=True)
    return "".join(lines[: _atom_lines(text)[20] + 1])


def _out_is_file(tmp, base):
    (tmp / "afile").write_text("x")
    return ["refine", str(base / "model.pdb"), str(base / "data.mtz"), "--out", str(tmp / "afile")]


def _out_parent_is_file(tmp, base):
    (tmp / "afile").write_text("x")
    return ["refine", str(base / "model.pdb"), str(base / "data.mtz"), "--out", str(tmp / "afile" / "sub")]


def _out_holds_input(tmp, base):
    (tmp / "prev" / "refined.pdb").write_text((base / "model.pdb").read_text())
    return refine(tmp, base, model=tmp / "prev" / "refined.pdb")


def _gzip_named_pdb(tmp, base):
    path = tmp / "zipped.pdb"
    path.write_bytes(gzip.compress((base / "model.pdb").read_bytes()))
    return refine(tmp, base, model=path)


def _other_cell(text):
    return text.replace("CRYST1    9.643    9.609   19.029", "CRYST1   12.643    9.609   19.029")


# id -> (argv builder (tmp, base) -> list, exit status, substrings the one error line must hold)
CASES = {
    # options and configuration: usage errors, exit 2
    "weight_negative": (lambda t, b: refine(t, b, "--weight", "-5"), 2, ["--weight", "must be a number > 0"]),
    "weight_not_a_number": (lambda t, b: refine(t, b, "--weight", "banana"), 2, ["--weight", "'banana'"]),
    "weight_infinite": (lambda t, b: refine(t, b, "--set", "weights.w_a=.inf"), 2, ["weights.w_a", "> 0"]),
    "n_cycles_negative": (lambda t, b: refine(t, b, "--set", "refine.n_cycles=-1"), 2, ["refine.n_cycles", ">= 0"]),
    "n_cycles_fraction": (lambda t, b: refine(t, b, "--set", "refine.n_cycles=1.7"), 2, ["refine.n_cycles", "integer"]),
    "cycles_option_fraction": (lambda t, b: refine(t, b, "--cycles", "1.7"), 2, ["--cycles", "1.7"]),
    "unknown_key": (lambda t, b: refine(t, b, "--set", "refine.n_cycle=3"), 2, ["refine.n_cycle", "unknown config key"]),
    "unknown_section": (lambda t, b: refine(t, b, "--set", "refin.n_cycles=3"), 2, ["'refin'", "unknown config section"]),
    "set_without_value": (lambda t, b: refine(t, b, "--set", "refine.n_cycles"), 2, ["--set", "section.key=value"]),
    "b_limits_unordered": (lambda t, b: refine(t, b, "--set", "refine.b_min=400"), 2, ["refine.b_min", "smaller than b_max"]),
    "d_min_zero": (lambda t, b: refine(t, b, "--d-min", "0"), 2, ["--d-min", "must be > 0"]),
    "strategy_unknown": (lambda t, b: refine(t, b, "--strategy", "everything"), 2, ["--strategy", "invalid choice"]),
    "bool_not_bool": (lambda t, b: refine(t, b, "--set", "output.plots=maybe"), 2, ["output.plots", "true or false"]),
    "free_fraction_too_big": (lambda t, b: refine(t, b, "--set", "data.free_fraction=2"), 2, ["data.free_fraction", "(0, 0.5]"]),
    "rotation_wrong_length": (lambda t, b: refine(t, b, "--set", "model.place_rotation=[1,2]"), 2,
                              ["model.place_rotation", "3 or 9 numbers"]),
    "config_is_a_list": (lambda t, b: refine(t, b, "--config", _yaml(t, "- 1\n- 2\n")), 2, ["cfg.yaml", "mapping of sections"]),
    "config_section_not_mapping": (lambda t, b: refine(t, b, "--config", _yaml(t, "refine: 5\n")), 2,
                                   ["cfg.yaml", "'refine' must be a mapping"]),
    "config_is_a_folder": (lambda t, b: refine(t, b, "--config", str(t)), 2, ["is a folder", "config file"]),
    "config_bad_yaml": (lambda t, b: refine(t, b, "--config", _yaml(t, "refine: [1, 2\n")), 2, ["cfg.yaml", "not valid YAML"]),
    "config_missing": (lambda t, b: refine(t, b, "--config", str(t / "none.yaml")), 2, ["none.yaml", "not found"]),
    "config_bad_value": (lambda t, b: refine(t, b, "--config", _yaml(t, "solvent:\n  update_every: 0\n")), 2,
                         ["cfg.yaml", "solvent.update_every", "> 0"]),
    "sf_d_min_zero": (lambda t, b: ["sf", str(b / "model.pdb"), "--d-min", "0", "--out", str(t / "fc.mtz")], 2,
                      ["--d-min", ">= 0.3"]),
    "sf_d_min_tiny": (lambda t, b: ["sf", str(b / "model.pdb"), "--d-min", "0.05", "--out", str(t / "fc.mtz")], 2,
                      ["--d-min", ">= 0.3"]),
    "omit_composite_negative": (lambda t, b: ["omit", str(b / "model.pdb"), str(b / "data.mtz"), "--composite", "-3",
                                              "--out", str(t / "prev")], 2, ["--composite", ">= 2"]),
    "validate_window_negative": (lambda t, b: ["validate", str(b / "model.pdb"), str(b / "data.mtz"), "--window", "-2"], 2,
                                 ["--window", ">= 2"]),
    "rfactors_bins_zero": (lambda t, b: ["rfactors", str(b / "model.pdb"), str(b / "data.mtz"), "--bins", "0"], 2,
                           ["--bins", ">= 1"]),
    "unknown_command": (lambda t, b: ["refien"], 2, ["invalid choice", "refien"]),
    # output folder
    "out_is_a_file": (_out_is_file, 1, ["afile", "not a folder"]),
    "out_parent_is_a_file": (_out_parent_is_file, 1, ["afile", "is a file"]),
    "out_holds_an_input": (_out_holds_input, 1, ["refined.pdb", "input file would be overwritten"]),
    "sf_out_is_the_model": (lambda t, b: ["sf", str(b / "model.pdb"), "--d-min", "2", "--out", str(b / "model.pdb")], 1,
                            ["model.pdb", "refusing to overwrite an input"]),
    # model files
    "model_missing": (lambda t, b: refine(t, b, model=t / "none.pdb"), 1, ["none.pdb", "not found"]),
    "model_is_a_folder": (lambda t, b: refine(t, b, model=t), 1, ["is a folder"]),
    "model_gzip_named_pdb": (_gzip_named_pdb, 1, ["zipped.pdb", "gzip-compressed"]),
    "model_not_a_model": (lambda t, b: refine(t, b, model=_model(t, b, lambda s: "hello\nworld\n")), 1, ["bad.pdb", "no atoms"]),
    "coordinate_not_a_number": (lambda t, b: refine(t, b, model=_model(t, b, lambda s: _edit_atom(s, 3, 38, 46, "abc"))), 1,
                                ["bad.pdb", "y (columns 39-46)", "'abc'"]),
    "coordinate_nan": (lambda t, b: refine(t, b, model=_model(t, b, lambda s: _edit_atom(s, 3, 30, 38, "nan"))), 1,
                       ["bad.pdb", "non-finite coordinates"]),
    "truncated_pdb": (lambda t, b: refine(t, b, model=_model(t, b, _truncate)), 1, ["bad.pdb", "truncated"]),
    "occupancy_above_one": (lambda t, b: refine(t, b, model=_model(t, b, lambda s: _edit_atom(s, 2, 54, 60, "1.50"))), 1,
                            ["bad.pdb", "occupancy outside [0, 1]"]),
    "occupancy_negative": (lambda t, b: refine(t, b, model=_model(t, b, lambda s: _edit_atom(s, 2, 54, 60, "-0.50"))), 1,
                           ["bad.pdb", "occupancy outside [0, 1]"]),
    "occupancy_all_zero": (lambda t, b: refine(t, b, model=_model(t, b, lambda s: _every_atom(s, 54, 60, "0.00"))), 1,
                           ["bad.pdb", "every atom has occupancy 0"]),
    "b_negative": (lambda t, b: refine(t, b, model=_model(t, b, lambda s: _edit_atom(s, 2, 60, 66, "-5.00"))), 1,
                   ["bad.pdb", "negative B"]),
    "b_above_b_max": (lambda t, b: refine(t, b, model=_model(t, b, lambda s: _every_atom(s, 60, 66, "9999."))), 1,
                      ["bad.pdb", "refine.b_max"]),
    "atom_line_duplicated": (lambda t, b: refine(t, b, model=_model(t, b, _duplicate_atom)), 1, ["bad.pdb", "duplicated atoms"]),
    "atom_renamed_cb_to_ca": (lambda t, b: refine(t, b, model=_model(t, b, lambda s: s.replace(" CB  LEU A   1", " CA  LEU A   1"))),
                              1, ["bad.pdb", "duplicated atoms", "A/LEU 1/CA"]),
    "no_cryst1": (lambda t, b: ["info", str(_model(t, b, lambda s: "".join(ln for ln in s.splitlines(True)
                                                                            if not ln.startswith("CRYST1"))))], 1, ["bad.pdb", "space group", "CRYST1"]),
    "cell_mismatch": (lambda t, b: refine(t, b, model=_model(t, b, _other_cell)), 1, ["bad.pdb", "data.mtz", "differ"]),
    "ligand_is_a_model": (lambda t, b: refine(t, b, "--ligand", str(b / "model.pdb")), 1,
                          ["model.pdb", "not a CIF restraint dictionary"]),
    "monlib_missing": (lambda t, b: refine(t, b, "--monlib", str(t / "monomers")), 1, ["monomers", "monomer library", "--monlib"]),
    "geometry_ligand_is_a_model": (lambda t, b: ["geometry", str(b / "model.pdb"), "--ligand", str(b / "model.pdb")], 1,
                                   ["model.pdb", "not a CIF restraint dictionary"]),
    "ligand_missing": (lambda t, b: refine(t, b, "--ligand", str(t / "lig.cif")), 1, ["lig.cif", "not found"]),
    # reflection files
    "data_missing": (lambda t, b: refine(t, b, data=t / "none.mtz"), 1, ["none.mtz", "not found"]),
    "data_not_mtz": (lambda t, b: refine(t, b, data=_model(t, b, lambda s: "junk", name="junk.mtz")), 1, ["junk.mtz", "cannot read"]),
    "labin_swapped": (lambda t, b: refine(t, b, "--labin", "SIGFP,FP,FREE"), 1, ["data.mtz", "'SIGFP' has MTZ type Q"]),
    "labin_free_not_flags": (lambda t, b: refine(t, b, "--labin", "FP,SIGFP,SIGI"), 1, ["data.mtz", "'SIGI' has MTZ type Q"]),
    "labin_unknown_column": (lambda t, b: refine(t, b, "--labin", "FOBS,SIGFOBS"), 1, ["data.mtz", "'FOBS'", "not found"]),
    "all_flags_free": (lambda t, b: refine(t, b, "--set", "data.free_value=0",
                                            data=_mtz(t, b, lambda m: _set_column(m, "FREE", lambda c, d: 0 * c))), 1,
                       ["bad.mtz", "every reflection", "--free-value"]),
    "free_value_absent": (lambda t, b: refine(t, b, "--set", "data.free_value=7"), 1, ["data.mtz", "only 0 free"]),
    "free_set_too_small": (lambda t, b: refine(t, b, "--d-min", "4"), 1, ["data.mtz", "only 2 free reflections"]),
    "damaged_mtz_hkl": (lambda t, b: ["info", str(b / "model.pdb"), str(_mtz(t, b, _huge_hkl))], 1,
                        ["bad.mtz", "(400, 0, 1)", "damaged"]),
    "no_reflection_left": (lambda t, b: refine(t, b, data=_mtz(t, b, lambda m: _set_column(m, "FP", lambda c, d: c * np.nan))), 1,
                           ["bad.mtz", "no reflections left"]),
    # selections
    "omit_selection_garbage": (lambda t, b: ["omit", str(b / "model.pdb"), str(b / "data.mtz"), "--select", "resi 3 foo",
                                             "--out", str(t / "prev")], 1, ["model.pdb", "resi 3 foo"]),
    "omit_nothing_selected": (lambda t, b: ["omit", str(b / "model.pdb"), str(b / "data.mtz"), "--out", str(t / "prev")], 1,
                              ["model.pdb", "nothing to omit"]),
}


def _snapshot(*folders) -> dict:
    out = {}
    for folder in folders:
        for root, _, files in os.walk(folder):
            for f in files:
                p = os.path.join(root, f)
                out[p] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


def run_cli(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, base, tmp_path, capsys):
    build, status, words = CASES[case]
    prev = tmp_path / "prev"
    prev.mkdir()
    for name, text in OLD_RESULTS.items():
        (prev / name).write_text(text)
    argv = build(tmp_path, base)
    before = _snapshot(tmp_path, base)
    rc, out, err = run_cli(argv, capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("jaxrefine: ")]
    assert rc == status, err
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert "Traceback" not in out + err
    assert _snapshot(tmp_path, base) == before  # inputs and previous results untouched, nothing new written


def test_the_table_is_large_enough():
    assert len(CASES) >= 40


# ----------------------------------------------------------------------------- data cleaning
def test_infinite_and_duplicated_reflections_are_counted(base, tmp_path):
    from jaxrefine.io.reflections import read_reflections

    clean = read_reflections(base / "data.mtz")

    def spoil(mtz):
        data = np.array(mtz, copy=True)
        fp = mtz.column_labels().index("FP")
        data[np.isfinite(data[:, fp]).nonzero()[0][0], fp] = np.inf
        rows = np.isfinite(data[:, fp]).nonzero()[0][1:51]
        twins = data[rows].copy()
        twins[:, :3] *= -1  # Friedel mates of 50 reflections: the same reflection listed again
        twins[:, fp] += 1.0
        mtz.set_data(np.vstack([data, twins]))

    refl = read_reflections(_mtz(tmp_path, base, spoil))
    assert refl.n_removed["infinite value"] == 1
    assert refl.n_removed["duplicates merged"] == 50
    assert refl.n == clean.n - 1
    assert np.all(np.isfinite(refl.f_obs))


def test_generated_free_set_is_announced(base, tmp_path, caplog):
    from jaxrefine.io.reflections import read_reflections

    path = _mtz(tmp_path, base, lambda m: m.remove_column(m.column_labels().index("FREE")))
    with caplog.at_level("INFO", logger="jaxrefine"):
        refl = read_reflections(path)
    assert refl.free_convention.startswith("generated") and refl.n_free == round(0.05 * refl.n)
    assert any("generated a free set" in r.getMessage() for r in caplog.records)


def test_water_on_a_twofold_gets_half_occupancy(tmp_path, caplog):
    """A water on a crystallographic 2-fold in P 1 2 1 (x = 0, z = 0) is given occupancy 0.5."""
    from jaxrefine.io.model import read_model

    path = tmp_path / "p2.pdb"
    path.write_text(
        "CRYST1   10.000   12.000   14.000  90.00 100.00  90.00 P 1 2 1                  \n"
        "HETATM    1  O   HOH A   1       0.000   3.000   0.000  1.00 20.00           O  \n"
        "HETATM    2  O   HOH A   2       2.000   3.000   2.000  1.00 20.00           O  \n"
        "END\n"
    )
    with caplog.at_level("WARNING", logger="jaxrefine"):
        model = read_model(path)
    np.testing.assert_allclose(model.occ, [0.5, 1.0])
    assert "special position (multiplicity 2)" in caplog.text


# ----------------------------------------------------------------------------- outputs
def test_staged_output_is_all_or_nothing(tmp_path):
    from jaxrefine.io.writers import staged_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old a")
    (out / "plot.png").write_text("old plot")
    (out / "notes.txt").write_text("user's file")
    with pytest.raises(RuntimeError):
        with staged_output(out, managed=("a.txt", "plot.png")) as stage:
            Path(stage, "a.txt").write_text("new a")
            raise RuntimeError("disk full")
    assert (out / "a.txt").read_text() == "old a" and (out / "plot.png").exists()
    with staged_output(out, managed=("a.txt", "plot.png")) as stage:
        Path(stage, "a.txt").write_text("new a")
    assert (out / "a.txt").read_text() == "new a"
    assert not (out / "plot.png").exists()  # a result of the older run is not left beside the new ones
    assert (out / "notes.txt").read_text() == "user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def test_files_get_the_users_umask(tmp_path):
    from jaxrefine.io.writers import staged_output, write_text

    old = os.umask(0o022)
    try:
        with staged_output(tmp_path / "new") as stage:
            write_text(Path(stage, "x.txt"), "x")
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "x.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o755


def test_metrics_json_is_strict_json(tmp_path):
    from jaxrefine.io.writers import write_json

    path = tmp_path / "m.json"
    write_json(path, {"w_a": float("nan"), "r": np.float32(0.25), "cycles": [{"x": np.inf}], "n": np.int64(3)})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"w_a": None, "r": 0.25, "cycles": [{"x": None}], "n": 3}


def test_failed_run_keeps_old_results_and_logs_the_error(base, tmp_path, capsys):
    """An error after the log started (an unknown residue: no restraints) leaves the old results as
    they were and the error in refine.failed.log; nothing else is written."""
    prev = tmp_path / "prev"
    prev.mkdir()
    for name, text in OLD_RESULTS.items():
        (prev / name).write_text(text)
    model = _model(tmp_path, base, lambda s: s.replace("LEU A   1", "XYZ A   1"))
    before = _snapshot(prev)
    rc, out, err = run_cli(refine(tmp_path, base, model=model), capsys)
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("jaxrefine: ") and "XYZ" in err.strip().splitlines()[-1]
    after = _snapshot(prev)
    failed = str(prev / "refine.failed.log")
    assert after.pop(failed) and after == before
    assert "XYZ" in Path(failed).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pdb", "prev"]  # no staging folder left


def test_verbose_shows_the_traceback(base, tmp_path, capsys):
    rc, _, err = run_cli(["-v", *refine(tmp_path, base, "--labin", "SIGFP,FP,FREE")], capsys)
    assert rc == 1 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("jaxrefine: ")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_ends_the_run_cleanly(base, tmp_path, sig):
    """SIGINT/SIGTERM while the problem compiles: one line, exit 130/143, no segfault, old results kept."""
    prev = tmp_path / "prev"
    prev.mkdir()
    for name, text in OLD_RESULTS.items():
        (prev / name).write_text(text)
    before = _snapshot(prev)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "jaxrefine.cli", *refine(tmp_path, base, "--set", "refine.n_cycles=1")],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    t0 = time.time()
    for line in proc.stderr:  # the run has started its work once it reports the compilation cache
        if "compilation cache" in line or time.time() - t0 > 120:
            break
    proc.send_signal(sig)
    _, rest = proc.communicate(timeout=300)
    err = rest.strip().splitlines()
    assert proc.returncode == 128 + sig, rest
    assert err[-1].startswith("jaxrefine: interrupted") and err[-1].endswith("nothing written")
    assert "Traceback" not in rest
    assert _snapshot(prev) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]


def test_a_signal_in_the_middle_of_a_log_write_is_logged_after_it():
    """The first SIGINT/SIGTERM's notice when the signal arrives while the main thread is inside a log record's
    write (Python runs the handler between that thread's bytecodes): logged once the write is done, with no
    "reentrant call" logging error and its traceback (seen once in CI as a failure of the test above)."""
    import io
    import logging

    from jaxrefine.refine.run import _SignalGuard

    guard = _SignalGuard()  # not entered: no handler of the process is replaced; the handler is called as a signal would
    written = []

    class Raw(io.RawIOBase):
        fired = False

        def writable(self):
            return True

        def write(self, b):
            if not Raw.fired:  # the signal arrives while the buffered stream flushes the first record
                Raw.fired = True
                guard._handle(signal.SIGTERM, None)
            written.append(bytes(b))
            return len(b)

    handler = logging.StreamHandler(io.TextIOWrapper(io.BufferedWriter(Raw()), encoding="utf-8"))
    errors = []
    handler.handleError = lambda record: errors.append(sys.exc_info()[1])
    log = logging.getLogger("jaxrefine")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.info("a record being written")
        guard._wait_for_notice()
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    text = b"".join(written).decode()
    assert errors == []
    assert text.splitlines() == ["a record being written",
                                 "SIGTERM received: stopping at the end of this step (again to stop at once)"]
    with pytest.raises(KeyboardInterrupt, match="interrupted .SIGTERM. before the first cycle; nothing written"):
        guard.check()


@pytest.mark.slow
def test_a_run_replaces_the_old_results_together(base, tmp_path, capsys):
    """A successful run (no flag column: the free set is generated) replaces the old results as a
    whole: a plot of the older run is removed, the generated free set is in the log and in
    metrics.json (strict JSON), files get the umask's mode, no staging folder is left."""
    prev = tmp_path / "prev"
    prev.mkdir()
    for name, text in {**OLD_RESULTS, "r_vs_cycle.png": "OLD PLOT"}.items():
        (prev / name).write_text(text)
    (prev / "my_notes.txt").write_text("mine")
    data = _mtz(tmp_path, base, lambda m: m.remove_column(m.column_labels().index("FREE")), name="nofree.mtz")
    old = os.umask(0o022)
    try:
        rc, out, err = run_cli(refine(tmp_path, base, "--set", "refine.n_cycles=0", data=data), capsys)
    finally:
        os.umask(old)
    assert rc == 0, err
    names = sorted(p.name for p in prev.iterdir())
    assert names == ["config.yaml", "maps.mtz", "metrics.json", "my_notes.txt", "refine.log", "refined.cif", "refined.pdb",
                     "run.json"]
    m = json.loads((prev / "metrics.json").read_text())
    assert m["free_set"]["generated"] and m["free_set"]["n_free"] == round(0.05 * (m["free_set"]["n_free"] + m["free_set"]["n_work"]))
    assert "generated a free set" in (prev / "refine.log").read_text()
    assert all((prev / n).stat().st_mode & 0o777 == 0o644 for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nofree.mtz", "prev"]


def test_full_disk_leaves_the_old_results(base, tmp_path, capsys, monkeypatch):
    """A write error in the middle of writing the outputs (ENOSPC) ends in one line naming --out;
    the old results stay as they were."""
    import errno

    from jaxrefine.refine import run as run_module

    def half_written(model_path, data_path, inputs, stage, *args):
        Path(stage, "refined.cif").write_text("NEW, INCOMPLETE")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(stage, "maps.mtz")))

    monkeypatch.setattr(run_module, "_run", half_written)
    prev = tmp_path / "prev"
    prev.mkdir()
    for name, text in OLD_RESULTS.items():
        (prev / name).write_text(text)
    before = _snapshot(prev)
    rc, out, err = run_cli(refine(tmp_path, base), capsys)
    line = err.rstrip().splitlines()[-1]
    assert rc == 1 and line.startswith(f"jaxrefine: {prev}: cannot write the results (No space left on device)"), err
    assert "Traceback" not in err
    after = _snapshot(prev)
    failed = str(prev / "refine.failed.log")
    assert after.pop(failed) and "No space left" in Path(failed).read_text()
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prev"]
