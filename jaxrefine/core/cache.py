"""JAX's persistent compilation cache: compiled XLA code kept on disk between processes.

A refinement compiles the same few functions (F_calc and its gradient, the restraint energies, the
optimiser step) for every run.  With the cache on, a second run of a problem of the same shapes
loads them from disk instead of compiling again (5kzb: see benchmarks/README.md).

Where the cache lives, first match wins:

1. ``cache_dir`` (``runtime.compilation_cache`` in the config): a folder, or ``off``;
2. ``$JAXREFINE_CACHE_DIR``: a folder, or ``off``;
3. a cache folder the caller already gave JAX (``jax.config.update("jax_compilation_cache_dir", ...)``,
   e.g. a test session's temporary folder): left as it is;
4. ``$XDG_CACHE_HOME/jaxrefine/jax``, else ``~/.cache/jaxrefine/jax``.

The cache is trusted code (see JAX's documentation): keep it in a folder only you can write to.
The largest programs also keep their lowered form there (:func:`call_exported`, ``exported/``: pickled
``jax.export`` artifacts), which a warm run reads instead of tracing again.

The folder is kept under a size (``runtime.cache_max_mb``): a process that used it deletes, when it ends, the least
recently used files once the folder holds more (:func:`prune_cache`), so that hundreds of datasets and the programs
of older jaxrefine versions do not fill the disk.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading

import jax

from ..errors import ConfigError
from . import background
from .heap import trim_after_compilations, trimming

log = logging.getLogger("jaxrefine")

ENV_VAR = "JAXREFINE_CACHE_DIR"
_OFF = ("off", "none", "false", "no", "0", "disabled")
# Compilations shorter than this are not written.  0: every executable is written, the ~200 one-operation
# programs of host-side JAX code included.  Each of those takes ~15-20 ms to compile and a few ms to load,
# so on a warm 5kzb run keeping them cut the process's compile-or-load time from 3.4 s to 0.7 s
# (setup 3.6 -> 1.8 s, whole run 16 -> 12-14 s); the cache grows by ~200 small files.
MIN_COMPILE_TIME_S = 0.0


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/jaxrefine/jax`` (``~/.cache/jaxrefine/jax`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxrefine", "jax")


def _is_off(value) -> bool:
    return value is False or (isinstance(value, str) and value.strip().lower() in _OFF)


def _is_auto(value) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto", "default"))


def resolve_cache_dir(cache_dir=None) -> str | None:
    """The folder the cache will use for ``cache_dir`` (see the module docstring); None when off."""
    for value, origin in ((cache_dir, "runtime.compilation_cache"), (os.environ.get(ENV_VAR), f"${ENV_VAR}")):
        if _is_off(value):
            return None
        if not _is_auto(value):
            if not isinstance(value, (str, os.PathLike)):
                raise ConfigError(f"{origin} = {value!r}: expected auto, off or a folder")
            return os.path.abspath(os.path.expanduser(os.fspath(value)))
    current = jax.config.jax_compilation_cache_dir
    if current:
        return os.fspath(current)
    return default_cache_dir()


def enable_compilation_cache(cache_dir: str | None = None, max_mb: float | None = None) -> str | None:
    """Turn JAX's persistent compilation cache on (or off) for this process.

    Args:
        cache_dir: a folder, ``"off"`` (also ``False``), or None / ``"auto"`` for the default
            order (``$JAXREFINE_CACHE_DIR``, a folder already set in JAX, the user's cache folder).
        max_mb: the folder's size limit (MB; ``runtime.cache_max_mb``), kept when this process ends
            (:func:`prune_cache`); None or 0: no limit from this call.

    Returns:
        The cache folder in use, or None when the cache is off.

    Raises:
        ConfigError: the folder cannot be created.
    """
    trim_after_compilations()  # process-wide runtime settings live here: every entry point calls this
    path = resolve_cache_dir(cache_dir)
    if path is None:
        if jax.config.jax_compilation_cache_dir:
            _set_dir(None)
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"runtime.compilation_cache: cannot create the cache folder {path} ({exc.strerror}); "
                          f"pass another folder or 'off'") from None
    jax.config.update("jax_enable_compilation_cache", True)
    if jax.config.jax_persistent_cache_min_compile_time_secs > MIN_COMPILE_TIME_S:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    if jax.config.jax_compilation_cache_dir != path:
        _set_dir(path)
    log.debug("JAX compilation cache: %s", path)
    if max_mb:
        _prune_at_exit(path, float(max_mb) * 2**20)
    return path


# --- the folder's size ---------------------------------------------------------------------------
PRUNE_TO = 0.8  # a folder over its limit is cut to this fraction of it, so that not every run prunes again
PRUNE_MIN_AGE_S = 300.0  # files written or read this recently are kept (another process may be using them)
_prune_limits: dict = {}  # folder -> limit (bytes) this process keeps at exit


def prune_cache(folder: str, max_bytes: float, now: float | None = None) -> int:
    """Keep the cache ``folder`` under ``max_bytes``: when it holds more, delete its least recently used files (JAX's
    executables, the exported programs, the tables; last use = a file's access or modification time, whichever is
    later: a load marks its exported program) until it holds PRUNE_TO × ``max_bytes``, sparing the files used in the
    last PRUNE_MIN_AGE_S.  A deleted program is compiled again when next needed.  Only the cache's own files count
    and go (:func:`_cache_files`): a folder given as the cache that holds other files keeps them.

    Returns:
        the bytes deleted (0 when within the limit, or ``max_bytes`` <= 0: no limit).
    """
    import time

    if max_bytes <= 0:
        return 0
    now = time.time() if now is None else now
    files = []
    for path in _cache_files(folder):
        try:
            st = os.stat(path)
        except OSError:  # deleted meanwhile by another process
            continue
        files.append((max(st.st_atime, st.st_mtime), st.st_size, path))
    total = sum(size for _, size, _ in files)
    if total <= max_bytes:
        return 0
    freed = 0
    for used, size, path in sorted(files):
        if total - freed <= PRUNE_TO * max_bytes or now - used < PRUNE_MIN_AGE_S:
            break
        try:
            os.remove(path)
            freed += size
        except OSError:
            continue
    log.debug("compilation cache %s: %.0f MB over its %.0f MB limit, %.0f MB of least recently used files deleted",
              folder, total / 2**20, max_bytes / 2**20, freed / 2**20)
    return freed


def _cache_files(folder: str) -> list:
    """The files of the cache ``folder`` that JAX or jaxrefine wrote: JAX's executables (``*-cache``, ``*-atime``)
    at the top, the exported programs (``exported/*.pkl``) and the tables (``tables/*.json``)."""
    own = [(folder, ("-cache", "-atime")), (os.path.join(folder, EXPORT_SUBFOLDER), (".pkl",)),
           (os.path.join(folder, TABLES_SUBFOLDER), (".json",))]
    out = []
    for sub, endings in own:
        try:
            with os.scandir(sub) as it:
                out += [e.path for e in it if e.is_file(follow_symlinks=False) and e.name.endswith(endings)]
        except OSError:  # no such subfolder
            continue
    return out


def _prune_at_exit(folder: str, max_bytes: float) -> None:
    """Keep ``folder`` under ``max_bytes`` when this process ends (after the background preparations), or at
    :func:`prune_registered` (the command's quick exit skips ``atexit``)."""
    if not _prune_limits:
        atexit.register(prune_registered)
    _prune_limits[folder] = max_bytes


def prune_registered() -> None:
    """Keep every cache folder this process used under its limit now (:func:`prune_cache`); once."""
    while _prune_limits:
        folder, limit = _prune_limits.popitem()
        try:
            prune_cache(folder, limit)
        except Exception as exc:  # never fail a finished run over the cache's size
            log.debug("pruning %s failed (%s)", folder, exc)


def _set_dir(path: str | None) -> None:
    """Point JAX at another cache folder; its cache object is re-created on the next compile."""
    jax.config.update("jax_compilation_cache_dir", path)
    try:  # private API: without it a cache already opened keeps its first folder
        from jax._src import compilation_cache

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):  # pragma: no cover - other JAX versions
        pass


# --- compile-time accounting (jax.monitoring events) ------------------------------------------
_COMPILE_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "compile_s",  # XLA compile, or a cache load
}
_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "cache_hits", "/jax/compilation_cache/cache_misses": "cache_misses"}
_totals = {"trace_s": 0.0, "lower_s": 0.0, "compile_s": 0.0, "cache_hits": 0, "cache_misses": 0}
_totals_lock = threading.Lock()  # programs are compiled on several threads (background preparation, scan trials)
_listening = False


def _on_duration(event: str, duration: float, **_kw) -> None:
    key = _COMPILE_EVENTS.get(event)
    if key is not None:
        with _totals_lock:
            _totals[key] += duration


def _on_event(event: str, **_kw) -> None:
    key = _CACHE_EVENTS.get(event)
    if key is not None:
        with _totals_lock:
            _totals[key] += 1


def compile_counters() -> dict:
    """Running totals of this process's JAX compilation work since the first call.

    Keys: ``trace_s``, ``lower_s`` (jaxpr → StableHLO), ``compile_s`` (XLA backend compile, or the
    load from the persistent cache), ``cache_hits``, ``cache_misses``.  Subtract two snapshots to
    time a stretch of code::

        before = compile_counters(); ...; spent = compile_delta(before)
    """
    global _listening
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        jax.monitoring.register_event_listener(_on_event)
        _listening = True
    with _totals_lock:
        return dict(_totals)


def compile_delta(before: dict) -> dict:
    """Compilation work since the snapshot ``before`` (from :func:`compile_counters`), plus ``total_s``."""
    now = compile_counters()
    out = {k: now[k] - before.get(k, 0) for k in now}
    out["total_s"] = out["trace_s"] + out["lower_s"] + out["compile_s"]
    return out


# --- traced programs kept on disk (jax.export) ------------------------------------------------------
# The persistent cache above keys compiled code by the lowered program, so a warm run still traces and
# lowers every function before it can look the executable up: ~1 s for the L-BFGS program of 5kzb (trace
# 0.73 s + lower 0.19 s), whatever the cache holds.  The largest programs therefore also keep their
# lowered form (a jax.export artifact) in the cache folder, keyed by the arguments' structure, shapes and
# dtypes, JAX's version, the backend and a digest of jaxrefine's source: a warm run reads it back and
# skips tracing and lowering (5kzb: first call 1.6 s -> 0.6 s).
EXPORT_SUBFOLDER = "exported"
_exported: dict = {}  # key -> (jitted Exported.call, output treedef), or None where exporting failed
_digest: list = []


def _source_digest() -> str:
    """sha256 over the jaxrefine package's Python source (any edit invalidates every stored program)."""
    if not _digest:
        import hashlib

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        h = hashlib.sha256()
        for folder, _, files in sorted(os.walk(root)):  # sorted: the same order on every machine
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(folder, name)
                h.update(os.path.relpath(path, root).encode())
                with open(path, "rb") as fh:
                    h.update(fh.read())
        _digest.append(h.hexdigest())
    return _digest[0]


def _cache_subfolder(name: str) -> str | None:
    """``<cache folder>/<name>``, or None when the cache is off."""
    if not jax.config.jax_enable_compilation_cache or not jax.config.jax_compilation_cache_dir:
        return None
    return os.path.join(os.fspath(jax.config.jax_compilation_cache_dir), name)


def _export_folder() -> str | None:
    return _cache_subfolder(EXPORT_SUBFOLDER)


def _static_id(value) -> tuple:
    """What identifies a static argument across processes: a function by its module, qualified name, name
    and the values it closes over (``SHIFT_ENERGY``'s functions differ only in those); else its repr."""
    if callable(value):
        cells = tuple(repr(c.cell_contents) for c in (getattr(value, "__closure__", None) or ()))
        return (getattr(value, "__module__", ""), getattr(value, "__qualname__", ""), getattr(value, "__name__", ""), cells)
    return (repr(value),)


def _export_key(name: str, static: dict, treedef, leaves) -> str:
    import hashlib

    import jaxlib

    avals = [(tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))) for x in leaves]
    text = repr((name, sorted((k, _static_id(v)) for k, v in static.items()), str(treedef), avals, jax.__version__,
                 jaxlib.__version__, jax.default_backend(), bool(jax.config.jax_enable_x64), _source_digest()))
    return hashlib.sha256(text.encode()).hexdigest()


def call_exported(jitted, args: tuple, static: dict, name: str):
    """``jitted(*args, **static)``, with its lowered program kept on disk between processes.

    The first call in a process with a given key loads ``<cache folder>/exported/<key>.pkl`` (written
    by an earlier process) or exports ``jitted`` there; later calls reuse the loaded program.  Falls back
    to the plain call when the cache is off, inside a trace (tracer arguments: the caller's program is
    being traced anyway) and when exporting fails.

    Args:
        jitted: a ``jax.jit`` function of ``(*args, **static)``.
        args: its array arguments (pytrees).
        static: its static (hashable) keyword arguments, e.g. the objective function.
        name: a label for the key.
    """
    folder = _export_folder()
    leaves, treedef = jax.tree_util.tree_flatten(args)
    if folder is None or any(isinstance(x, jax.core.Tracer) for x in leaves):
        return jitted(*args, **static)
    # all arguments committed to one device: the program compiled once more for every new mix of committed
    # (outputs of earlier programs) and uncommitted arguments.  jax.device_put to an array's own device is no
    # copy, and it moves numpy input without the one-operation program jnp.asarray compiles per shape.
    devices = {d for x in leaves if isinstance(x, jax.Array) and x.committed for d in x.devices()}
    if len(devices) > 1:
        return jitted(*args, **static)
    leaves = jax.device_put(leaves, devices.pop() if devices else jax.devices()[0])
    key = _export_key(name, static, treedef, leaves)
    with _lock:
        gate = None if key in _called else _first_call.setdefault(key, threading.Lock())
    if gate is None:
        return _call_prepared(jitted, key, treedef, leaves, static, folder)
    # the first call of a program in this process, one thread at a time: threads that call it together (the w_A
    # scan's trials) wait for the one that loads or compiles it, and then run the compiled executable
    with gate:
        out = _call_prepared(jitted, key, treedef, leaves, static, folder)
        with _lock:
            _called.add(key)
            _first_call.pop(key, None)
    return out


def _call_prepared(jitted, key: str, treedef, leaves, static: dict, folder: str):
    """The body of :func:`call_exported` once the arguments are placed and keyed."""
    with _lock:
        pending = _pending.pop(key, None)
    if pending is not None:  # compiled in the background (prepare_exported): wait for it
        pending.result()
    if key not in _exported:
        entry = _load_or_export(jitted, treedef, leaves, static, os.path.join(folder, key + ".pkl"))
        _exported[key] = None if entry is None else (jax.jit(entry[0].call), entry[1])
    entry = _exported[key]
    if entry is None:
        return jitted(*jax.tree_util.tree_unflatten(treedef, leaves), **static)
    call, out_tree = entry
    if key in _exported_call:  # an executable compiled ahead of time for arguments of these shapes
        try:
            return jax.tree_util.tree_unflatten(out_tree, call(*leaves))
        except TypeError:  # it does not take them after all (e.g. other placements): compile for them
            call = jax.jit(_exported_call.pop(key))
            _exported[key] = (call, out_tree)
    return jax.tree_util.tree_unflatten(out_tree, call(*leaves))


# --- small tables of computed values kept beside the programs -------------------------------------------
TABLES_SUBFOLDER = "tables"


def read_table(name: str) -> dict:
    """The stored table ``name`` (a JSON object written by :func:`write_table` with this jaxrefine source), or {}
    when the cache is off, the file is missing or unreadable, or an edit of the source made it stale."""
    import json

    folder = _cache_subfolder(TABLES_SUBFOLDER)
    if folder is None:
        return {}
    try:
        with open(os.path.join(folder, name + ".json")) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("source") != _source_digest() or not isinstance(data.get("values"), dict):
        return {}
    return data["values"]


def write_table(name: str, values: dict) -> None:
    """Store ``values`` (JSON-serialisable; floats round-trip exactly) as the table ``name``, whole file or none;
    nothing when the cache is off or the folder is not writable."""
    import json

    folder = _cache_subfolder(TABLES_SUBFOLDER)
    if folder is None:
        return
    try:
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f"{name}.json.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump({"source": _source_digest(), "values": values}, fh)
        os.replace(tmp, os.path.join(folder, name + ".json"))
    except OSError as exc:
        log.debug("could not store table %s (%s)", name, exc)


# --- compiling ahead, on a thread of its own ------------------------------------------------------------
_lock = threading.Lock()
_pending: dict = {}  # key -> Future of a background preparation (prepare_exported)
_exported_call: dict = {}  # key -> Exported.call of the programs prepared in the background
_called: set = set()  # keys call_exported has run in this process
_first_call: dict = {}  # key -> Lock held by the thread making a program's first call


def _aval(x):
    """Shape, dtype and weak type of a leaf as :func:`call_exported` will see it (after its device_put)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    x = jax.device_put(x)  # no copy for device arrays; a Python number becomes a weakly typed array
    return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=bool(x.weak_type))


def prepare_exported(jitted, args: tuple, static: dict, name: str):
    """Start compiling what :func:`call_exported` will call with arguments shaped like ``args`` (arrays, or
    ``jax.ShapeDtypeStruct`` for values not computed yet), on a background thread: trace and export the program
    (or read it from the cache folder) and compile it (or load it from the persistent cache), while the caller
    goes on computing those values.  The first :func:`call_exported` with the same key waits for it and runs the
    compiled executable.  A cold 5kzb run compiles its L-BFGS program (4.3 s) while the setup fits the mask,
    scales and σA (1.7 s).  Nothing happens when the cache is off or the program is prepared already.

    Returns:
        the ``concurrent.futures.Future`` of the preparation, or None when nothing was started.
    """
    folder = _export_folder()
    if folder is None:
        return None
    leaves, treedef = jax.tree_util.tree_flatten(args)
    leaves = [_aval(x) for x in leaves]
    key = _export_key(name, static, treedef, leaves)
    def work():
        try:
            entry = _load_or_export(jitted, treedef, leaves, static, os.path.join(folder, key + ".pkl"))
            if entry is not None:
                with trimming():  # the compilation's freed memory back to the system as it goes (core/heap.py)
                    compiled = jax.jit(entry[0].call).lower(*leaves).compile()
                _exported_call[key] = entry[0].call
                entry = (compiled, entry[1])
            _exported[key] = entry
            return key
        except Exception as exc:  # the caller compiles as if nothing had been prepared
            log.debug("preparing %s in the background failed (%s)", name, exc)
            return None

    with _lock:
        if key in _exported or key in _pending:
            return None
        # waited for by a process that ends meanwhile (an error later in the setup): core/background.py
        future = background.start(work, f"prepare-{name}")
        _pending[key] = future
    return future


def _load_or_export(jitted, treedef, leaves, static: dict, path: str):
    """(Exported, output treedef) from ``path``, else exported now and written there; None on failure."""
    import dataclasses
    import pickle

    try:
        with open(path, "rb") as fh:
            exp, tree = pickle.load(fh)
        if isinstance(exp, jax.export.Exported) and isinstance(tree, jax.tree_util.PyTreeDef):
            try:
                os.utime(path)  # used now: the last a size limit deletes (prune_cache)
            except OSError:
                pass
            return exp, tree
        log.debug("stored program %s is not an exported program: exporting again", path)
    except FileNotFoundError:
        pass
    except Exception as exc:  # a damaged or foreign file: export again
        log.debug("stored program %s unreadable (%s): exporting again", path, exc)
    out_tree = []

    def flat(*lv):
        out_leaves, tree = jax.tree_util.tree_flatten(jitted(*jax.tree_util.tree_unflatten(treedef, lv), **static))
        out_tree.append(tree)
        return out_leaves

    try:
        # the VJP closure cannot be pickled (these programs are called, never differentiated), and it holds the
        # traced function and with it JAX's caches of its jaxpr and lowering: dropped here, they are freed (a cold
        # 1va7 run's minimiser: 21 MB)
        exp = dataclasses.replace(jax.export.export(jax.jit(flat))(*leaves), _get_vjp=None)
        data = pickle.dumps((exp, out_tree[0]))
    except Exception as exc:
        log.debug("could not export %s (%s): plain jit", getattr(jitted, "__name__", jitted), exc)
        return None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)  # whole file or none: a concurrent reader never sees half of it
    except OSError as exc:
        log.debug("could not store %s (%s)", path, exc)
    return exp, out_tree[0]
