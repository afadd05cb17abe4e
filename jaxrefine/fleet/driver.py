"""Refine many entries on a Dask cluster: one task per entry, results written as they finish.

The distributed engine is ``dask.distributed`` (the ``fleet`` extra): a LocalCluster of worker
processes by default, or any running Dask scheduler (dask-jobqueue on SLURM/PBS, Kubernetes, a
cloud cluster) through its address; the output folder must then be on a file system every worker
sees.  Each task is :func:`jaxrefine.fleet.worker.run_entry`; it catches its own errors, so a task
raises only when its worker dies, and then only that entry fails (no retries, and the LocalCluster's
scheduler gives up on a task the first time its worker dies instead of moving it elsewhere).
"""
from __future__ import annotations

import copy
import importlib.util
import logging
import os

import numpy as np

from ..config import Config, config_from_dict, config_to_dict, load_config
from ..errors import ConfigError
from ..io.crystal_io import header_cell
from ..io.writers import write_json
from .manifest import as_entries
from .progress import ProgressLine
from .results import load_result, write_tables
from .worker import KEEP_INPUT_TOLERANCE, failed_record, one_line, result_path, run_entry

log = logging.getLogger("jaxrefine")

FINISHED = ("refined", "kept input")
# The LocalCluster's scheduler: a task whose worker dies fails at once (Dask's default moves it to
# another worker up to 3 times, which would let one bad entry kill several workers).
DASK_SETTINGS = {"distributed.scheduler.allowed-failures": 0}
REFRESH_S = 2.0  # redraw interval of the progress line while nothing finishes
# A screen's crystals of one form differ in cell by a fraction of a per cent, enough to change a spreading box by a
# grid point and so compile every program again (1va7 with its cell 0.3 % longer).  Entries of one space group within
# these bounds of the group's median cell get the group's range as runtime.cell_range (one FFT layout for all).
CELL_RANGE_LENGTH = 0.01  # relative to the median length
CELL_RANGE_ANGLE = 1.0  # degrees from the median angle
# runtime.grid_steps: auto for the entries of such a crystal form: the grid made for d_min rounded down to 16 steps per
# octave, so that crystals of nearby resolution share compiled programs (a lone run, or an entry alone in its form,
# takes its own d_min: the finer grid costs up to 10-15 % per evaluation where it crosses to a larger FFT size, and
# the step's reflection count up to ~20 % more reflections; benchmarks/README.md)
FLEET_GRID_STEPS = 16


def _require_dask():
    if importlib.util.find_spec("distributed") is None:
        raise ConfigError("batch refinement needs Dask: pip install 'jaxrefine[fleet]' (dask[distributed])")


def shared_config(config=None, overrides=()) -> dict:
    """The fleet's shared configuration as nested dicts (validated): a Config, a YAML path or None."""
    if isinstance(config, Config):
        if overrides:
            raise ConfigError("pass overrides with a config file or None, not with a Config object")
        return config_to_dict(config)
    return config_to_dict(load_config(config, overrides))


def _start_client(client, scheduler, workers: int):
    """(client, owned): the given client, a client of ``scheduler``, or a new LocalCluster's."""
    import dask
    from dask.distributed import Client, LocalCluster

    if client is not None:
        return client, False
    if scheduler:
        return Client(scheduler), True
    with dask.config.set(DASK_SETTINGS):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                               silence_logs=logging.ERROR)
    return Client(cluster), True


def _close(client) -> None:
    cluster = getattr(client, "cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def cell_ranges(entries: list) -> dict:
    """{entry id: [[lowest], [highest]] cell} for ``runtime.cell_range``: per space group, the range of the entries
    within CELL_RANGE_LENGTH and CELL_RANGE_ANGLE of the group's median cell (where two or more are); other entries
    are left out (their own cell).  Made from every entry of the screen, so that it does not depend on which
    entries a resumed run still has to do."""
    groups: dict = {}
    for e in entries:
        cell = header_cell(e.data, e.model)  # the MTZ header where the data are MTZ, else the model's
        if cell is not None:
            groups.setdefault(cell[0], []).append((e.id, np.asarray(cell[1], float)))
    out = {}
    for members in groups.values():
        cells = np.stack([c for _, c in members])
        med = np.median(cells, axis=0)
        near = (np.all(np.abs(cells[:, :3] - med[:3]) <= CELL_RANGE_LENGTH * med[:3], axis=1)
                & np.all(np.abs(cells[:, 3:] - med[3:]) <= CELL_RANGE_ANGLE, axis=1))
        if near.sum() < 2:
            continue
        span = [cells[near].min(0).tolist(), cells[near].max(0).tolist()]
        out.update({i: span for (i, _), ok in zip(members, near) if ok})
    return out


def entry_configs(entries: list, base: dict) -> dict:
    """{entry id: its configuration} where it differs from ``base``: for an entry that shares its crystal form with
    others in the screen (:func:`cell_ranges`), ``runtime.cell_range: auto`` becomes the form's range and
    ``runtime.grid_steps: auto`` FLEET_GRID_STEPS; other entries keep ``base`` (auto: their own cell and d_min)."""
    runtime = base.get("runtime", {})
    settings = {}
    if runtime.get("cell_range", "auto") == "auto":
        settings["cell_range"] = None  # the entry's range
    if runtime.get("grid_steps", "auto") == "auto":
        settings["grid_steps"] = FLEET_GRID_STEPS
    if not settings:
        return {}
    out = {}
    for i, span in cell_ranges(entries).items():
        out[i] = copy.deepcopy(base)
        out[i].setdefault("runtime", {}).update({k: span if v is None else v for k, v in settings.items()})
    return out


def pending_entries(entries: list, out_root: str, retry_failed: bool = False):
    """(records of entries already done, entries to run): finished entries are skipped, failed ones
    too unless ``retry_failed``; an entry whose inputs or settings changed runs again."""
    done, todo = {}, []
    for e in entries:
        rec = load_result(out_root, e)
        if rec is not None and (rec["status"] in FINISHED or not retry_failed):
            done[e.id] = rec
        else:
            todo.append(e)
    return done, todo


def refine_many(entries, out_dir, client=None, *, scheduler: str | None = None, workers: int = 2, config=None,
                overrides=(), retry_failed: bool = False, tolerance: float = KEEP_INPUT_TOLERANCE,
                progress: bool = True, as_dataframe: bool = False):
    """Refine every entry with the normal engine, each into ``out_dir/<id>/``; one row per entry.

    Args:
        entries: a manifest path (YAML, CSV or a glob of model files), or a list of
            :class:`~jaxrefine.fleet.manifest.Entry` or mappings with id, model, data
            (and optionally labin, ligands, monlib, set).
        out_dir: the fleet's output folder: ``<id>/`` per entry, ``results.csv``, ``results.md``.
        client: a ``dask.distributed.Client`` to use (left open); else ``scheduler`` or a
            LocalCluster of ``workers`` processes (closed at the end).
        config, overrides: the shared configuration (YAML path or Config) and ``section.key=value``
            strings; each entry's own settings are applied on top.
        retry_failed: run entries again whose stored result is a failure.
        tolerance: R-free rise above which the input model is kept (never worse).
        progress: draw the progress line on stderr.
        as_dataframe: return a pandas DataFrame (when pandas is installed) instead of a list of dicts.

    Returns:
        One record (dict, the columns of results.csv) per entry, in manifest order.
    """
    _require_dask()
    entries = as_entries(entries)
    base = shared_config(config, overrides)
    out_root = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_root, exist_ok=True)
    records, todo = pending_entries(entries, out_root, retry_failed)
    order = [e.id for e in entries]

    def table():
        write_tables(out_root, [records[i] for i in order if i in records])

    line = ProgressLine(len(entries), skipped=len(records), enabled=progress)
    if todo:
        client, owned = _start_client(client, scheduler, workers)
        try:
            link = getattr(client, "dashboard_link", None)
            if link:  # None when the scheduler runs no dashboard
                note = "" if importlib.util.find_spec("bokeh") else " (its status pages need bokeh: pip install bokeh)"
                line.say(f"fleet: Dask dashboard at {link}{note}")
            _run(client, todo, out_root, base, tolerance, records, table, line,
                 entry_bases=entry_configs(entries, base))
        finally:
            line.close()
            if owned:
                _close(client)
    table()
    _keep_cache_limit(base)
    rows = [records[i] for i in order]
    return _maybe_dataframe(rows, as_dataframe)


def _keep_cache_limit(base: dict) -> None:
    """The cache folder under ``runtime.cache_max_mb`` once the fleet is done (``base``: the shared configuration as
    :func:`shared_config` gives it; its workers may end without their exit handlers; on another machine's workers it
    is that machine's own folder, kept by its runs)."""
    from ..core.cache import prune_cache, resolve_cache_dir

    runtime = config_from_dict(base).runtime
    folder = resolve_cache_dir(runtime.compilation_cache)
    if folder and runtime.cache_max_mb and os.path.isdir(folder):
        prune_cache(folder, float(runtime.cache_max_mb) * 2**20)


def _run(client, todo, out_root, base, tolerance, records, table, line, task=run_entry, entry_bases=None) -> None:
    """Run one ``task(entry, out_root, base, tolerance)`` per entry (``entry_bases[entry.id]`` instead of ``base``
    where given) and collect the rows as they end.

    At most one task per worker thread is in flight (the next is submitted when one ends), so no
    task waits in a worker's queue: a worker that dies takes only the entry it was running, and
    "running" in the progress line is exact.  The thread count is asked again at each submission,
    so a cluster that scales up or down is used as it is.
    """
    from dask.distributed import wait

    queue = list(todo)
    in_flight = {}  # future -> entry
    n_done = n_failed = 0

    def submit_more():
        slots = max(1, sum(client.nthreads().values()))
        while queue and len(in_flight) < slots:
            e = queue.pop(0)
            fut = client.submit(task, e, out_root, (entry_bases or {}).get(e.id, base), tolerance,
                                key=f"jaxrefine-{e.id}-{os.urandom(4).hex()}", pure=False, retries=0)
            in_flight[fut] = e

    submit_more()
    line.update(0, 0, len(in_flight))
    while in_flight:
        try:
            finished, _ = wait(list(in_flight), timeout=REFRESH_S, return_when="FIRST_COMPLETED")
        except TimeoutError:
            line.draw()
            continue
        for fut in finished:
            entry = in_flight.pop(fut)
            try:
                rec = fut.result()
            except Exception as exc:  # the worker died (or the task could not run): this entry only
                rec = failed_record(entry, f"worker lost: {one_line(exc)}")
                write_json(result_path(out_root, entry.id), rec)
            records[entry.id] = rec
            if rec["status"] == "failed":
                n_failed += 1
                line.say(f"fleet: {entry.id} failed: {rec['error']}")
            else:
                n_done += 1
            table()
        submit_more()
        line.update(n_done, n_failed, len(in_flight))


def _maybe_dataframe(rows: list, as_dataframe: bool):
    if not as_dataframe:
        return rows
    if importlib.util.find_spec("pandas") is None:
        log.warning("pandas is not installed: returning the fleet table as a list of records")
        return rows
    import pandas as pd

    from .results import COLUMNS

    return pd.DataFrame([{k: r.get(k) for k in COLUMNS} for r in rows], columns=list(COLUMNS))
