"""Fleets (jaxrefine.fleet, ``jaxrefine batch``): manifests, the Dask driver, never-worse, resume.

The end-to-end checks run one small fleet (one macrocycle, few steps) with a LocalCluster of
2 workers: three refinable entries (5e5z; a copy of it in another folder; 5kzb with a deliberately
poor setting, so that its input is better than what refinement reaches) and two broken ones (a
missing model file, a residue with no restraint dictionary).  The two 5e5z entries have the same
shapes (each worker compiles them once); the workers share the test session's persistent
compilation cache.  The poor entry is 5kzb because its 231 free reflections make R-free follow the
damage: 5e5z's 18 free reflections gave a lower R-free even for models with R-work 0.08 higher.
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import OVER_STRONG_RESTRAINTS, dataset_paths
from jaxrefine.errors import ConfigError, InputError
from jaxrefine.fleet.manifest import Entry, read_manifest
from jaxrefine.fleet.progress import ProgressLine
from jaxrefine.fleet.worker import KEEP_INPUT_TOLERANCE, never_worse

# one pytest-xdist worker runs the whole module: its module fixtures are computed once
pytestmark = pytest.mark.xdist_group("fleet")

pytest.importorskip("distributed")

SHARED = ["refine.n_cycles=1", "refine.steps_xyz=5", "refine.steps_b=3"]
# The poor setting: restraints 10^3-10^4 times too strong pull the deposited model to ideal torsions,
# planes and flat B.  Measured on 5kzb (2026-12-01, this one-cycle fleet setting): R-free 0.2499 ->
# 0.2617 (+0.012, 6x the tolerance).
POOR = list(OVER_STRONG_RESTRAINTS)
# Same inputs and compiled code in another process: R-factors agree to float32 rounding.
R_REPRO = 1e-3
STATUS = {"a": "refined", "poor": "kept input", "b": "refined", "missing": "failed", "nodict": "failed"}  # manifest order


def test_module_is_one_work_unit_under_xdist(request):
    """With ``--dist loadgroup`` the module must run on one worker, or each worker recomputes the fleet
    fixtures (pytest 9.2 ignores the group name pytest-xdist 3.8 writes into the test id)."""
    if getattr(request.config.option, "loadgroup", False):
        assert request.node.nodeid.endswith("@fleet"), request.node.nodeid


def test_longest_first_units_exist():
    """The work units conftest.py schedules first name existing xdist groups or test files: a renamed group
    would silently lose its place (and the suite its balance on CI's 2 cores)."""
    from pathlib import Path

    import test_refine
    import test_uncertainty
    from conftest import DATASETS, FIRST_UNITS

    groups = {"fleet", test_uncertainty.pytestmark.args[0]}
    groups |= {m.args[0] for p in test_refine.BY_DATASET for m in p.marks if m.name == "xdist_group"}
    assert {f"refine-{p}" for p in DATASETS} <= groups
    files = {p.name for p in Path(__file__).parent.glob("test_*.py")}
    assert set(FIRST_UNITS) <= groups | files, set(FIRST_UNITS) - groups - files


# ----------------------------------------------------------------------------- manifests (fast)
def test_yaml_csv_and_pattern_manifests_give_the_same_entries(tmp_path):
    for name in ("x1", "x2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.pdb").write_text("")
        (tmp_path / name / "data.mtz").write_text("")
    (tmp_path / "m.yaml").write_text(
        "entries:\n"
        "  - {id: x1, model: x1/model.pdb, data: x1/data.mtz}\n"
        "  - {id: x2, model: x2/model.pdb, data: x2/data.mtz, labin: 'FP,SIGFP', ligands: [L.cif], set: [refine.n_cycles=2]}\n")
    (tmp_path / "m.csv").write_text("id,model,data,labin,ligands,set\n"
                                    "x1,x1/model.pdb,x1/data.mtz,,,\n"
                                    "x2,x2/model.pdb,x2/data.mtz,\"FP,SIGFP\",L.cif,refine.n_cycles=2\n")
    from_yaml = read_manifest(tmp_path / "m.yaml")
    assert from_yaml == read_manifest(tmp_path / "m.csv")
    x2 = from_yaml[1]
    assert x2.model == str(tmp_path / "x2" / "model.pdb")  # relative to the manifest's folder
    assert x2.config_overrides() == ["data.labin=FP,SIGFP", f"model.ligands=['{tmp_path / 'L.cif'}']", "refine.n_cycles=2"]
    pattern = read_manifest(str(tmp_path / "*" / "model.pdb"))
    assert [(e.id, e.model, e.data) for e in pattern] == [(e.id, e.model, e.data) for e in from_yaml]


def test_bad_manifests_are_one_line_errors_naming_the_file(tmp_path):
    (tmp_path / "dup.yaml").write_text("- {id: a, model: m.pdb, data: d.mtz}\n- {id: a, model: m.pdb, data: d.mtz}\n")
    with pytest.raises(ConfigError, match="dup.yaml: entry id 'a' appears twice"):
        read_manifest(tmp_path / "dup.yaml")
    (tmp_path / "key.yaml").write_text("- {id: a, model: m.pdb, data: d.mtz, ligand: x.cif}\n")
    with pytest.raises(ConfigError, match="key.yaml: entry 1: unknown key 'ligand'"):
        read_manifest(tmp_path / "key.yaml")
    (tmp_path / "id.csv").write_text("id,model,data\n../up,m.pdb,d.mtz\n")
    with pytest.raises(ConfigError, match="id.csv: row 2: entry id '../up'"):
        read_manifest(tmp_path / "id.csv")
    (tmp_path / "lonely").mkdir()
    (tmp_path / "lonely" / "model.pdb").write_text("")
    with pytest.raises(InputError, match="lonely: no reflection file"):
        read_manifest(str(tmp_path / "*" / "model.pdb"))


def test_never_worse_rule_and_progress_line(tmp_path):
    entry = Entry("e", str(tmp_path / "in.pdb"), "d.mtz")
    (tmp_path / "in.pdb").write_text("MODEL\n")
    cyc0 = {"r_work": 0.20, "r_free": 0.25, "rms_bond": 0.01, "rms_angle": 1.5}
    better = {"r_work": 0.18, "r_free": 0.25 + KEEP_INPUT_TOLERANCE * 0.9, "rms_bond": 0.02, "rms_angle": 2.0, "w_a": 1.0,
              "cycles": [cyc0]}
    assert never_worse(better, entry, str(tmp_path))["status"] == "refined"  # within the tolerance
    worse = dict(better, r_free=0.25 + KEEP_INPUT_TOLERANCE * 1.1)
    row = never_worse(worse, entry, str(tmp_path))
    assert row["status"] == "kept input" and row["r_free"] == 0.25 and row["rms_bond"] == 0.01
    assert (tmp_path / "input_in.pdb").read_text() == "MODEL\n" and row["model_out"] == os.path.join("e", "input_in.pdb")
    # the engine's guard kept the input itself (guard.keep_input): cycle 0 is the kept model
    kept_by_engine = dict(cyc0, w_a=1.0, cycles=[cyc0, dict(cyc0, r_free=0.2505)], best_cycle=0, r_free_refined=0.2505)
    row = never_worse(kept_by_engine, entry, str(tmp_path))
    assert row["status"] == "kept input" and row["r_free"] == 0.25 and row["r_free_refined"] == 0.2505
    line = ProgressLine(10, skipped=2, enabled=False)
    line.t0 -= 60.0  # one minute ago
    line.update(done=2, failed=1, running=2)
    assert line.text() == "fleet: 4/10 done (2 from before), 1 failed, 2 running, 3 left, 20 s/entry, about 2 min left"  # 20 s × (3 left + 2 running)


def test_a_worker_that_dies_fails_its_own_entry_only(tmp_path):
    """The LocalCluster's settings: a task whose worker process exits fails at once, alone."""
    from jaxrefine.fleet import driver

    def task(entry, out_root, base, tolerance):
        if entry.id == "crash":
            os._exit(1)  # the worker process dies mid-task
        time.sleep(1.0)
        return dict(driver.failed_record(entry, ""), status="refined")

    entries = [Entry(i, "m.pdb", "d.mtz") for i in ("one", "crash", "two", "three")]
    client, _ = driver._start_client(None, None, 2)
    records = {}
    try:
        driver._run(client, entries, str(tmp_path), {}, 0.0, records, lambda: None, ProgressLine(4, enabled=False), task=task)
    finally:
        driver._close(client)
    assert {k: r["status"] for k, r in records.items()} == {"one": "refined", "crash": "failed", "two": "refined",
                                                            "three": "refined"}
    assert records["crash"]["error"].startswith("worker lost: ")
    assert json.loads((tmp_path / "crash" / "result.json").read_text())["status"] == "failed"


# ----------------------------------------------------------------------------- a real fleet (slow)
def _cli(*args, log, **kw):
    """``jaxrefine ARGS`` in a subprocess, stdout and stderr into the file ``log`` (no pipe to fill)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "jaxrefine.cli", "-q", *args], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, text=True, **kw)


@pytest.fixture(scope="module")
def fleet_inputs(tmp_path_factory):
    """(manifest path, shared overrides): five entries as described in the module docstring."""
    import gemmi

    model, data = dataset_paths("5e5z")
    poor_model, poor_data = dataset_paths("5kzb")
    root = tmp_path_factory.mktemp("fleet")
    shared = list(SHARED)  # workers inherit $JAXREFINE_CACHE_DIR: the test session's compilation cache
    (root / "copy").mkdir()
    for p in (model, data):
        (root / "copy" / p.name).write_bytes(p.read_bytes())
    st = gemmi.read_structure(str(model))
    for res in st[0][0]:
        if res.name == "HOH":
            res.name = "ZZZ"  # in no dictionary
    st.write_pdb(str(root / "nodict.pdb"))
    # a and poor start together on the two workers; b goes to the first one free, a's (5e5z is quick), which has
    # its program compiled already (a and b second: both workers compiled 5e5z's program at once)
    rows = [{"id": "a", "model": str(model), "data": str(data)},
            {"id": "poor", "model": str(poor_model), "data": str(poor_data), "set": POOR},
            {"id": "b", "model": f"copy/{model.name}", "data": f"copy/{data.name}"},
            {"id": "missing", "model": "absent.pdb", "data": str(data)},
            {"id": "nodict", "model": "nodict.pdb", "data": str(data)}]
    import yaml

    (root / "fleet.yaml").write_text(yaml.safe_dump({"entries": rows}))
    return root / "fleet.yaml", shared


def _table(path):
    with open(path / "results.csv") as fh:
        return list(csv.DictReader(fh))


def _assert_same_table(rows, ref):
    assert [(r["id"], r["status"], r["error"]) for r in rows] == [(r["id"], r["status"], r["error"]) for r in ref]
    for r, q in zip(rows, ref):
        for key in ("r_work_in", "r_free_in", "r_work", "r_free"):
            if q[key]:
                assert float(r[key]) == pytest.approx(float(q[key]), abs=R_REPRO), (r["id"], key)


@pytest.fixture(scope="module")
def fleet_run(fleet_inputs, tmp_path_factory):
    from jaxrefine.fleet import refine_many

    manifest, shared = fleet_inputs
    out = tmp_path_factory.mktemp("fleet-out")
    records = refine_many(manifest, out, workers=2, overrides=shared, progress=False)
    return out, records


@pytest.mark.slow
def test_fleet_rows_statuses_and_errors(fleet_run):
    out, records = fleet_run
    assert {r["id"]: r["status"] for r in records} == STATUS
    rows = _table(out)
    assert [r["id"] for r in rows] == list(STATUS)  # manifest order, one row each
    by_id = {r["id"]: r for r in records}
    assert "absent.pdb" in by_id["missing"]["error"] and "\n" not in by_id["missing"]["error"]
    assert "ZZZ" in by_id["nodict"]["error"]
    for eid in ("a", "b"):
        r = by_id[eid]
        assert r["r_free"] <= r["r_free_in"] + KEEP_INPUT_TOLERANCE
        assert (out / eid / "refined.cif").is_file() and r["model_out"] == f"{eid}/refined.cif"
    # the same data and model in two folders refine to the same numbers
    assert by_id["b"]["r_free"] == pytest.approx(by_id["a"]["r_free"], abs=R_REPRO)
    poor = by_id["poor"]
    assert poor["r_free_refined"] > poor["r_free_in"] + KEEP_INPUT_TOLERANCE
    assert poor["r_free"] == poor["r_free_in"]  # the row reports the kept (input) model
    model, _ = dataset_paths("5kzb")
    assert (out / "poor" / "refined.cif").is_file() and (out / "poor" / f"input_{model.name}").is_file()
    assert "kept input" in (out / "results.md").read_text()


@pytest.mark.slow
def test_rerun_skips_finished_and_retries_failed_on_request(fleet_run, fleet_inputs):
    from jaxrefine.fleet import refine_many

    out, records = fleet_run
    manifest, shared = fleet_inputs
    stamps = {e: os.path.getmtime(out / e / "result.json") for e in STATUS}
    t0 = time.perf_counter()
    again = refine_many(manifest, out, workers=2, overrides=shared, progress=False)
    assert again == records
    assert {e: os.path.getmtime(out / e / "result.json") for e in STATUS} == stamps
    assert time.perf_counter() - t0 < 10  # nothing ran, no cluster started (loose: only catches a rerun)
    pd = pytest.importorskip("pandas")
    frame = refine_many(manifest, out, overrides=shared, progress=False, as_dataframe=True)
    assert isinstance(frame, pd.DataFrame) and list(frame["status"]) == list(STATUS.values())
    retried = refine_many(manifest, out, workers=2, overrides=shared, progress=False, retry_failed=True)
    changed = {e for e in STATUS if os.path.getmtime(out / e / "result.json") != stamps[e]}
    assert changed == {"missing", "nodict"}
    assert [r["status"] for r in retried] == list(STATUS.values())


@pytest.mark.slow
def test_killed_fleet_resumes_to_the_same_table(fleet_run, fleet_inputs, tmp_path):
    out_ref, _ = fleet_run
    manifest, shared = fleet_inputs
    out = tmp_path / "killed"
    sets = [a for s in shared for a in ("--set", s)]
    # one worker: entries run in manifest order, so the kill lands after the first one
    log = tmp_path / "killed.log"
    proc = _cli("batch", str(manifest), "--out", str(out), "--workers", "1", *sets, log=log, start_new_session=True)
    deadline = time.time() + 300
    while not (out / "a" / "result.json").exists():
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.time() < deadline, "no entry finished within 5 minutes"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI, its scheduler and its worker processes
    proc.wait()
    done = [e for e in STATUS if (out / e / "result.json").exists()]
    assert len(done) < len(STATUS)
    a_stamp = os.path.getmtime(out / "a" / "result.json")
    log = tmp_path / "resumed.log"
    resume = _cli("batch", str(manifest), "--out", str(out), "--workers", "2", *sets, log=log)
    resume.wait(timeout=600)
    assert resume.returncode == 0, log.read_text()[-2000:]
    assert "5 entries: 2 refined, 1 kept input, 2 failed" in log.read_text()
    assert os.path.getmtime(out / "a" / "result.json") == a_stamp  # not run again
    assert json.loads((out / "a" / "result.json").read_text())["status"] == "refined"
    _assert_same_table(_table(out), _table(out_ref))


def test_cell_ranges_per_crystal_form_leave_out_other_forms(tmp_path):
    """refine_many's runtime.cell_range for each entry: the range of its space group's cells within 1 % / 1° of the
    group's median (three P 21 21 21 crystals), with the fleet's grid steps; an entry 5 % off, one alone in its
    group and an unreadable one get neither (their own cell and d_min), and a user's settings are kept."""
    import gemmi
    import numpy as np

    from jaxrefine.fleet.driver import cell_ranges, entry_configs

    def mtz(name, sg, cell):
        m = gemmi.Mtz(with_base=True)
        m.spacegroup, m.cell = gemmi.SpaceGroup(sg), gemmi.UnitCell(*cell)
        m.add_dataset("x")
        m.set_data(np.zeros((0, 3), np.float32))
        m.write_to_file(str(tmp_path / name))
        return Entry(id=name[:-4], model=str(tmp_path / "absent.pdb"), data=str(tmp_path / name))

    entries = [mtz("a.mtz", "P 21 21 21", (50.0, 60.0, 70.0, 90, 90, 90)),
               mtz("b.mtz", "P 21 21 21", (50.3, 59.8, 70.1, 90, 90, 90)),
               mtz("c.mtz", "P 21 21 21", (49.9, 60.2, 70.0, 90, 90, 90)),
               mtz("far.mtz", "P 21 21 21", (52.5, 60.0, 70.0, 90, 90, 90)),
               mtz("alone.mtz", "P 1", (30.0, 40.0, 50.0, 80, 85, 95)),
               Entry(id="bad", model=str(tmp_path / "absent.pdb"), data=str(tmp_path / "absent.mtz"))]
    ranges = cell_ranges(entries)
    assert sorted(ranges) == ["a", "b", "c"]
    assert ranges["a"] == ranges["c"] == [[49.9, 59.8, 70.0, 90.0, 90.0, 90.0], [50.3, 60.2, 70.1, 90.0, 90.0, 90.0]]
    configs = entry_configs(entries, {"runtime": {"cell_range": "auto", "grid_steps": "auto"}})
    assert sorted(configs) == ["a", "b", "c"]
    assert configs["b"]["runtime"] == {"cell_range": ranges["b"], "grid_steps": 16}
    assert entry_configs(entries, {"runtime": {"cell_range": [], "grid_steps": 0}}) == {}
    assert entry_configs(entries, {"runtime": {"cell_range": [], "grid_steps": "auto"}})["c"]["runtime"] == {
        "cell_range": [], "grid_steps": 16}  # a setting of the user's kept


def test_fleet_keeps_the_cache_folder_under_its_limit(tmp_path):
    """Once the entries are done the driver keeps the shared configuration's cache folder under runtime.cache_max_mb
    (Dask's workers may end without their exit handlers)."""
    from jaxrefine.fleet.driver import _keep_cache_limit, shared_config

    folder = tmp_path / "cache"
    folder.mkdir()
    old = folder / "old-cache"
    old.write_bytes(b"x" * 2_000_000)
    os.utime(old, (time.time() - 86400, time.time() - 86400))
    _keep_cache_limit(shared_config(None, [f"runtime.compilation_cache={folder}", "runtime.cache_max_mb=10"]))
    assert old.exists()
    _keep_cache_limit(shared_config(None, [f"runtime.compilation_cache={folder}", "runtime.cache_max_mb=1"]))
    assert not old.exists()
