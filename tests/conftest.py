"""Shared fixtures: the real datasets under $JAXREFINE_DATA (default ../shared/data)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jax
import pytest

jax.config.update("jax_enable_x64", True)  # numerical references are checked in float64

# One persistent compilation cache for the session (and the CLI subprocesses it starts, through
# $JAXREFINE_CACHE_DIR): modules that build problems of the same shapes (the deposited and shaken
# checks of a dataset, the CLI and API runs of one refinement) load compiled code instead of
# compiling it again.  A temporary folder per run unless $JAXREFINE_CACHE_DIR names one to keep.
_OWN_CACHE = not os.environ.get("JAXREFINE_CACHE_DIR")
if _OWN_CACHE:
    os.environ["JAXREFINE_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxrefine-test-cache-")
if os.environ["JAXREFINE_CACHE_DIR"].lower() != "off":
    jax.config.update("jax_compilation_cache_dir", os.environ["JAXREFINE_CACHE_DIR"])
    from jaxrefine.core.cache import MIN_COMPILE_TIME_S

    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)


# Restraint weights 10^3-10^4 times too strong: refinement pulls a deposited model to ideal geometry and
# flat B and R-free rises (the never-worse rules of the engine's guard and of the fleet are tested with them)
OVER_STRONG_RESTRAINTS = ("weights.w_a=10000", "weights.w_b=10000", "weights.torsion=1000", "weights.plane=1000",
                          "weights.nonbonded=1000", "weights.chiral=1000")


MAX_WORKERS = 4
GB_PER_WORKER = 6  # peak RSS of one worker running the real-data refinements (4iid, 5orl)


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pyproject addopts): one worker per core, at most MAX_WORKERS and one per 6 GB."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = GB_PER_WORKER * MAX_WORKERS
    return max(1, min(cores, MAX_WORKERS, int(mem_gb // GB_PER_WORKER)))


# Longest work units first (longest-processing-time-first list scheduling).  By default xdist's loadgroup orders
# the work units by their number of tests, not their cost; pyproject's addopts pass --no-loadscope-reorder, so
# units go out in collection order, which this hook sorts by the costs measured per unit on 2 cores (2026-12-01):
# uncertainty 260 s, each refine-<pid> group 65-110 s, fleet 100 s, notebooks 25-70 s each (pytest 866 -> 821 s).
# Remeasured 2026-12-01 (a slower day, --durations): uncertainty ~290 s, notebooks 19-100 s each (05: 100 s, 04:
# 68 s), refine groups 60-100 s, fleet ~90 s; the notebooks were the 9th of 10 units (pytest 930 -> 916 s).
# 2026-12-01 h: the 5kzb unit also holds the rigid-body, LS/ML and guard checks on 5kzb (they share its problems) and the
# 4xof unit its rigid-body check; costs from a profiled run of that day: 5kzb ~150 s, 4xof ~120 s, 5orl ~100 s,
# 1va7 ~95 s, 4iid ~95 s, fleet ~90 s, 1l2h ~80 s, 5e5z ~40 s.
# 2026-12-02, with XLA's older CPU fusion emitters (jaxrefine/core/xla_options.py; per-test wall summed by unit): uncertainty
# 240 s, notebooks 148 s, 5kzb 89 s, 4xof 83 s, 1va7 73 s, 5orl 70 s, 4iid 68 s, 1l2h 59 s, fleet 54 s (pytest 620 s).
# Only under xdist (workers): a serial run keeps modules together.
FIRST_UNITS = ("uncertainty", "test_notebooks.py", "refine-5kzb", "refine-4xof", "refine-1va7", "refine-5orl", "refine-4iid",
               "refine-1l2h", "fleet", "refine-5e5z")


def _unit_rank(item) -> int:
    marker = item.get_closest_marker("xdist_group")
    name = (marker.args[0] if marker and marker.args else marker.kwargs.get("name")) if marker else item.path.name
    return FIRST_UNITS.index(name) if name in FIRST_UNITS else len(FIRST_UNITS)


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):
        items.sort(key=_unit_rank)  # stable: the order within a unit is kept


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAXREFINE_CACHE_DIR"], ignore_errors=True)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("JAXREFINE_DATA", REPO.parent / "shared" / "data"))
XRAY = DATA / "xray"
MONOMERS = DATA / "monomers"
DATASETS = ("5e5z", "4xof", "1l2h", "5orl", "4iid", "1va7", "5kzb")
SMALL_DATASETS = ("5e5z", "1va7", "5kzb")

_SKIP_REASON = f"real data not found at {DATA} (set JAXREFINE_DATA to the shared data folder)"


def dataset_paths(pdb_id: str):
    """(model path, reflection path) of a shared dataset; skips when the data are absent."""
    folder = XRAY / pdb_id
    if not folder.is_dir():
        pytest.skip(_SKIP_REASON)
    model = next(p for p in sorted(folder.iterdir()) if p.name.startswith(pdb_id) and (".pdb" in p.name or ".cif" in p.name))
    data = next(p for p in sorted(folder.iterdir()) if ".mtz" in p.name)
    return model, data


def monomer_dir():
    if not MONOMERS.is_dir():
        pytest.skip(_SKIP_REASON)
    return MONOMERS


@pytest.fixture(params=DATASETS)
def dataset(request):
    """(pdb_id, model path, data path) for every shared dataset."""
    return (request.param, *dataset_paths(request.param))


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_functions():
    """Free JAX's compiled executables after each test module.

    One pytest process compiles hundreds of XLA CPU executables over the suite; each holds memory
    mappings, and a long run hit a segmentation fault inside XLA compilation (likely the process's
    mapping limit).  Modules share nothing compiled, so clearing between them costs nothing.
    """
    yield
    jax.clear_caches()
