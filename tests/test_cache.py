"""Persistent compilation cache: where it lives, switching it off, and a second process hitting it."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest

from jaxrefine.errors import ConfigError
from jaxrefine.core import cache


@pytest.fixture
def restore_jax_cache():
    """Put the session's cache settings back after a test that changes them."""
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    yield
    cache._set_dir(saved[0])
    jax.config.update("jax_enable_compilation_cache", saved[1])


def test_resolution_order(tmp_path, monkeypatch, restore_jax_cache):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    cache._set_dir(None)
    assert cache.resolve_cache_dir("auto") == str(tmp_path / "xdg" / "jaxrefine" / "jax")
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "env"))
    assert cache.resolve_cache_dir(None) == str(tmp_path / "env")
    assert cache.resolve_cache_dir(str(tmp_path / "cfg")) == str(tmp_path / "cfg")  # config beats env
    monkeypatch.setenv(cache.ENV_VAR, "off")
    assert cache.resolve_cache_dir("auto") is None
    assert cache.resolve_cache_dir(False) is None  # YAML reads a bare `off` as false
    with pytest.raises(ConfigError, match="runtime.compilation_cache"):
        cache.resolve_cache_dir(3)


def test_enable_and_disable(tmp_path, monkeypatch, restore_jax_cache):
    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    path = cache.enable_compilation_cache(str(tmp_path / "c"))
    assert path == str(tmp_path / "c") and os.path.isdir(path)
    assert jax.config.jax_compilation_cache_dir == path
    assert cache.enable_compilation_cache("auto") == path  # a folder already set is kept
    assert cache.enable_compilation_cache("off") is None
    assert not jax.config.jax_enable_compilation_cache
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot create"):
        cache.enable_compilation_cache(str(tmp_path / "file" / "sub"))


def test_build_setup_turns_the_cache_on(tmp_path, monkeypatch, restore_jax_cache):
    """Scripts and notebooks that build a problem without calling refine() use the cache too."""
    from conftest import dataset_paths
    from jaxrefine.config import load_config
    from jaxrefine.problem import build_setup

    monkeypatch.delenv(cache.ENV_VAR, raising=False)
    cache.enable_compilation_cache("off")
    build_setup(*dataset_paths("5e5z"), load_config(None, [f"runtime.compilation_cache={tmp_path / 'c'}", "refine.adp=iso"]))
    assert jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
    assert any((tmp_path / "c").iterdir())  # and the setup's own programs were written there


_CHILD = """
import json, sys
import jax, jax.numpy as jnp
from jaxrefine.core.cache import enable_compilation_cache, compile_counters, compile_delta
enable_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # write even a fast compile
before = compile_counters()
f = jax.jit(lambda x: jnp.fft.fftn(jnp.sin(x) * jnp.cos(x[::-1])).real.sum())
f(jnp.ones((24, 24, 24))).block_until_ready()
print(json.dumps(compile_delta(before)))
"""


def test_second_process_hits_the_cache(tmp_path):
    """Two fresh interpreters: the first compiles and writes, the second loads from disk."""
    env = dict(os.environ)
    env.pop(cache.ENV_VAR, None)
    runs = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "c")], capture_output=True,
                             text=True, timeout=120, env=env, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["cache_misses"] >= 1 and runs[0]["cache_hits"] == 0
    assert runs[1]["cache_hits"] >= 1 and runs[1]["cache_misses"] == 0
    assert any((tmp_path / "c").iterdir())


def test_cache_folder_is_kept_under_its_size_limit(tmp_path):
    """Over the limit, the least recently used files go (access or modification time, whichever is later; the
    exported programs too) until the folder holds PRUNE_TO of it; files used in the last minutes stay; within the
    limit, or with no limit, nothing goes; files the cache did not write are neither counted nor deleted."""
    folder = tmp_path / "c"
    (folder / "exported").mkdir(parents=True)
    (folder / "mine").mkdir()
    now = time.time()
    paths = []
    for k in range(10):  # 10 files of 100 kB, last used k hours ago (the exported ones read, not written, lately)
        p = folder / "exported" / f"f{k}.pkl" if k % 2 else folder / f"f{k}-cache"
        p.write_bytes(b"x" * 100_000)
        os.utime(p, (now - 3600 * k, now - 3600 * (k + 20 if k % 2 else k)))
        paths.append(p)
    others = [folder / "notes.txt", folder / "mine" / "old-cache", folder / "exported" / "readme.md"]
    for p in others:  # not the cache's files: never counted or deleted
        p.write_bytes(b"y" * 1_000_000)
        os.utime(p, (now - 10**6, now - 10**6))
    assert cache.prune_cache(str(folder), 0, now=now) == 0  # no limit
    assert cache.prune_cache(str(folder), 1_000_000, now=now) == 0 and all(p.exists() for p in paths)
    freed = cache.prune_cache(str(folder), 500_000, now=now)
    assert freed == 600_000 and [p.exists() for p in paths] == [True] * 4 + [False] * 6
    assert sum(p.stat().st_size for p in paths if p.exists()) <= cache.PRUNE_TO * 500_000
    os.utime(paths[3], (now - 60, now - 60))  # in use by another process: kept even over the limit
    assert cache.prune_cache(str(folder), 100_000, now=now) == 200_000 and paths[3].exists() and paths[0].exists()
    assert all(p.exists() for p in others)


def test_a_run_prunes_its_cache_folder_when_it_ends(tmp_path):
    """enable_compilation_cache(folder, max_mb) keeps the folder under max_mb when the process ends."""
    folder = tmp_path / "c"
    folder.mkdir()
    old = folder / "old-cache"
    old.write_bytes(b"x" * 2_000_000)
    os.utime(old, (time.time() - 86400, time.time() - 86400))
    env = dict(os.environ)
    env.pop(cache.ENV_VAR, None)
    code = ("import sys; from jaxrefine.core import cache; cache.enable_compilation_cache(sys.argv[1], float(sys.argv[2]))")
    subprocess.run([sys.executable, "-c", code, str(folder), "10"], check=True, timeout=120, env=env)
    assert old.exists()  # 2 MB within 10 MB
    subprocess.run([sys.executable, "-c", code, str(folder), "1"], check=True, timeout=120, env=env)
    assert not old.exists()


def test_the_command_prunes_the_cache_folder_before_its_quick_exit(tmp_path, monkeypatch, restore_jax_cache):
    """The jaxrefine command ends with os._exit (no atexit handlers): it keeps the folder's limit first."""
    from jaxrefine import cli

    folder = tmp_path / "c"
    folder.mkdir()
    old = folder / "old-cache"
    old.write_bytes(b"x" * 2_000_000)
    os.utime(old, (time.time() - 86400, time.time() - 86400))
    monkeypatch.setattr(cli, "main", lambda: cache.enable_compilation_cache(str(folder), 1) and 0)

    def no_exit(status):
        raise SystemExit(status)

    monkeypatch.setattr(os, "_exit", no_exit)
    with pytest.raises(SystemExit):
        cli.console_main()
    assert not old.exists()


# ------------------------------------------------------------------- lowered programs kept on disk
_TRACES = []


def _weighted_sum(x, w, *, power):
    _TRACES.append(power)  # runs only while tracing
    return {"y": jax.numpy.sum(w * x**power), "n": x.shape[0]}


_weighted_sum_jit = jax.jit(_weighted_sum, static_argnames=("power",))


def _power_of(p):
    def fn(x):
        return x**p

    return fn


def test_exported_program_is_stored_and_read_back_without_tracing(tmp_path, restore_jax_cache):
    """``call_exported``: the same values as the plain jit; a later process (here: the in-process table
    cleared) reads the stored program and does not trace; other static arguments, shapes and dtypes are
    other programs; inside a trace, and with the cache off, it is the plain call."""
    cache.enable_compilation_cache(str(tmp_path / "c"))
    cache._exported.clear()
    _TRACES.clear()
    x, w = jax.numpy.arange(4.0), jax.numpy.ones(4)
    ref = _weighted_sum_jit(x, w, power=2)
    got = cache.call_exported(_weighted_sum_jit, (x, w), {"power": 2}, "test")
    assert float(got["y"]) == float(ref["y"]) == 14.0 and int(got["n"]) == 4
    stored = list((tmp_path / "c" / cache.EXPORT_SUBFOLDER).glob("*.pkl"))
    assert len(stored) == 1
    cache._exported.clear()  # as in a new process
    n_before = len(_TRACES)
    again = cache.call_exported(_weighted_sum_jit, (x + 1, w), {"power": 2}, "test")
    assert len(_TRACES) == n_before and float(again["y"]) == 30.0  # read back: not traced
    cache.call_exported(_weighted_sum_jit, (x, w), {"power": 3}, "test")
    cache.call_exported(_weighted_sum_jit, (jax.numpy.arange(5.0), jax.numpy.ones(5)), {"power": 2}, "test")
    assert len(list(stored[0].parent.glob("*.pkl"))) == 3
    # functions that differ only in the values they close over (like SHIFT_ENERGY's) are told apart
    assert cache._static_id(_power_of(2)) != cache._static_id(_power_of(3))
    inside = jax.jit(lambda a: cache.call_exported(_weighted_sum_jit, (a, w), {"power": 2}, "test")["y"])(x)
    assert float(inside) == 14.0 and len(list(stored[0].parent.glob("*.pkl"))) == 3
    cache.enable_compilation_cache("off")
    assert float(cache.call_exported(_weighted_sum_jit, (x, w), {"power": 2}, "test")["y"]) == 14.0


def test_minimiser_through_the_stored_program_matches_the_plain_one(restore_jax_cache, tmp_path):
    """The refinement's L-BFGS loop gives the same point through its stored program as compiled directly."""
    from jaxrefine.refine.optimize import _minimise_jit, minimise_with_stats

    cache.enable_compilation_cache(str(tmp_path / "c"))
    cache._exported.clear()
    target = jax.numpy.array([1.0, -2.0, 3.0])
    x0 = {"a": jax.numpy.zeros(3)}
    got = minimise_with_stats(_quadratic, x0, (target,), 20)
    ref = _minimise_jit(x0, (target,), 20, 0.01, 0.0, fun=_quadratic, method="lbfgs")
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jax.numpy.all(a == b)), got, ref))
    assert float(jax.numpy.abs(got[0]["a"] - target).max()) < 1e-4 and int(got[2].steps) > 0


def _quadratic(x, target):
    return jax.numpy.sum((x["a"] - target) ** 2)


def test_a_program_prepared_in_the_background_is_the_one_called(tmp_path, restore_jax_cache):
    """``prepare_exported`` from shapes alone (a ShapeDtypeStruct for a value not computed yet): the later
    ``call_exported`` with real arrays neither traces nor compiles nor loads anything, and gives the plain
    jit's values; preparing again is a no-op; with the cache off nothing is started."""
    cache.enable_compilation_cache(str(tmp_path / "c"))
    cache._exported.clear()
    x, w = jax.numpy.arange(4.0), jax.numpy.ones(4)
    future = cache.prepare_exported(_weighted_sum_jit, (jax.ShapeDtypeStruct((4,), x.dtype), w), {"power": 5}, "test")
    assert future is not None and future.result(timeout=120) is not None
    assert cache.prepare_exported(_weighted_sum_jit, (x, w), {"power": 5}, "test") is None  # prepared already
    n_traces, before = len(_TRACES), cache.compile_counters()
    got = cache.call_exported(_weighted_sum_jit, (x, w), {"power": 5}, "test")
    spent = cache.compile_delta(before)
    assert spent["cache_hits"] + spent["cache_misses"] == 0 and spent["compile_s"] == 0.0, spent
    assert len(_TRACES) == n_traces
    assert float(got["y"]) == float(_weighted_sum_jit(x, w, power=5)["y"]) == 276.0 and int(got["n"]) == 4
    cache.enable_compilation_cache("off")
    assert cache.prepare_exported(_weighted_sum_jit, (x, w), {"power": 6}, "test") is None


def test_threads_calling_a_new_program_together_export_it_once(tmp_path, restore_jax_cache, monkeypatch):
    """``call_exported`` from three threads at once with a program this process has not called (the w_A scan's
    trials after the atoms changed): one thread exports (or loads) and compiles it, the others wait for it and
    run it; each gets its own values."""
    cache.enable_compilation_cache(str(tmp_path / "c"))
    cache._exported.clear()
    exports = []
    load_or_export = cache._load_or_export

    def slow(*args, **kwargs):  # the threads would all be here at once, unless they wait for the first
        exports.append(1)
        time.sleep(0.5)
        return load_or_export(*args, **kwargs)

    monkeypatch.setattr(cache, "_load_or_export", slow)
    xs = [jax.numpy.arange(4.0) + k for k in range(3)]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda x: cache.call_exported(_weighted_sum_jit, (x, x), {"power": 7}, "test"), xs))
    assert [float(g["y"]) for g in got] == [float(np.sum((np.arange(4.0) + k) ** 8)) for k in range(3)]  # w = x
    assert len(exports) == 1


def test_state_spec_has_the_fitted_states_shapes(restore_jax_cache):
    """``xray_state_spec`` (what the minimiser is compiled for while the setup fits the state) against the state
    build_setup fits: same tree, shapes, dtypes and weak types, with the resolution-dependent scale (5e5z at
    1.66 Å) and without it (the same data cut at 2.6 Å)."""
    from conftest import dataset_paths
    from jaxrefine.config import load_config
    from jaxrefine.problem import build_setup
    from jaxrefine.problem.setup import load_inputs
    from jaxrefine.problem.xray_state import xray_state_spec

    def aval(x):
        x = x if isinstance(x, jax.ShapeDtypeStruct) else jax.device_put(x)
        return tuple(x.shape), str(x.dtype), bool(x.weak_type)

    cfg = load_config(None, ["runtime.compilation_cache=off", "refine.adp=iso"])
    model, refl = load_inputs(*dataset_paths("5e5z"), cfg)
    for data in (refl, refl.cut(d_min=2.6)):
        specs = []
        setup = build_setup(None, None, cfg, model=model, refl=data, on_problem=lambda *a: specs.append(a))
        (problem, params, spec, seen_refl, strategy), = specs
        assert problem is setup.problem and seen_refl is setup.refl and strategy == setup.strategy[0] == "xyz_b"
        assert spec == xray_state_spec(setup.problem, setup.state.nonbonded, setup.refl.d_min)
        assert jax.tree_util.tree_structure(spec) == jax.tree_util.tree_structure(setup.state)
        assert jax.tree_util.tree_map(aval, spec) == jax.tree_util.tree_map(aval, setup.state)
        assert (spec.scales.k_iso is None) == (data.d_min > 2.5)


def test_refinement_setup_compiles_the_minimiser_while_it_fits_the_state(tmp_path, restore_jax_cache):
    """The CLI's build_setup hook (engine.prepare_refinement): the L-BFGS program is prepared from the state's
    shapes during the setup, and the starting w_A's gradient then runs it without compiling or loading it."""
    from conftest import dataset_paths
    from jaxrefine.config import load_config
    from jaxrefine.problem import build_setup
    from jaxrefine.refine.blocks import xray_gradient_norm
    from jaxrefine.refine.engine import prepare_refinement

    cfg = load_config(None, [f"runtime.compilation_cache={tmp_path / 'c'}", "refine.adp=iso"])
    cache._exported.clear()
    hook, futures = prepare_refinement(cfg), []
    setup = build_setup(*dataset_paths("5e5z"), cfg, on_problem=lambda *a: futures.append(hook(*a)))
    assert futures and futures[0] is not None and futures[0].result(timeout=300) in cache._exported
    before = cache.compile_counters()
    assert xray_gradient_norm(setup.params, setup.problem, setup.state) > 0
    spent = cache.compile_delta(before)
    assert spent["cache_hits"] + spent["cache_misses"] == 0, spent  # the prepared executable, nothing else


def test_gauss_newton_only_refinement_prepares_that_program_and_compiles_no_lbfgs_loop(tmp_path, restore_jax_cache):
    """Where every macrocycle takes Gauss-Newton steps alone (``refine.gn_steps`` and no L-BFGS steps; auto for
    4iid), the setup hook prepares the Gauss-Newton program and the starting w_A's gradient runs it, loading and
    compiling nothing else; that gradient norm is the one the L-BFGS loop gives."""
    from conftest import dataset_paths
    from jaxrefine.config import load_config
    from jaxrefine.problem import build_setup
    from jaxrefine.refine.blocks import gauss_newton_block, xray_gradient_norm
    from jaxrefine.refine.engine import choose_initial_w_a, prepare_refinement

    cfg = load_config(None, [f"runtime.compilation_cache={tmp_path / 'c'}", "refine.adp=iso", "refine.gn_steps=2",
                             "refine.steps_xyz=0"])
    cache._exported.clear()
    hook, futures = prepare_refinement(cfg), []
    setup = build_setup(*dataset_paths("5e5z"), cfg, on_problem=lambda *a: futures.append(hook(*a)))
    assert futures and futures[0] is not None and futures[0].result(timeout=300) in cache._exported
    before, programs = cache.compile_counters(), set(cache._exported)
    assert choose_initial_w_a(setup) > 0
    moved, _ = gauss_newton_block(setup.params, setup.problem, setup.state, 1, with_b=True)  # a macrocycle's steps
    spent = cache.compile_delta(before)
    assert spent["cache_hits"] + spent["cache_misses"] == 0, spent  # the prepared executable, nothing else
    assert set(cache._exported) == programs  # no L-BFGS loop
    assert not np.allclose(np.asarray(moved.xyz_frac), np.asarray(setup.params.xyz_frac))
    gn = xray_gradient_norm(setup.params, setup.problem, setup.state, gauss_newton_with_b=True)
    lbfgs = xray_gradient_norm(setup.params, setup.problem, setup.state)
    assert gn == pytest.approx(lbfgs, rel=1e-4)


def test_a_damaged_stored_program_is_exported_again(tmp_path, restore_jax_cache):
    cache.enable_compilation_cache(str(tmp_path / "c"))
    cache._exported.clear()
    x, w = jax.numpy.arange(3.0), jax.numpy.ones(3)
    cache.call_exported(_weighted_sum_jit, (x, w), {"power": 1}, "test")
    (stored,) = (tmp_path / "c" / cache.EXPORT_SUBFOLDER).glob("*.pkl")
    for junk in (b"not a pickle", pickle.dumps(("a", "b"))):
        stored.write_bytes(junk)
        cache._exported.clear()
        assert float(cache.call_exported(_weighted_sum_jit, (x, w), {"power": 1}, "test")["y"]) == 3.0
        assert stored.read_bytes() != junk  # replaced by a good one


def test_xla_defaults_only_for_tested_jaxlib_and_never_over_the_user():
    from jaxrefine.core import xla_options as X

    flag = X.FUSION_FLAG
    tested = ".".join(map(str, X.TESTED_JAXLIB[0])) + ".7"
    assert X.xla_flags_with_defaults("", tested) == flag
    assert X.xla_flags_with_defaults("--xla_foo=1", tested) == f"--xla_foo=1 {flag}"
    assert X.xla_flags_with_defaults("--xla_cpu_use_fusion_emitters=true", tested) == "--xla_cpu_use_fusion_emitters=true"
    for untested in ("99.1.0", "0.4.30", "nonsense", None):  # XLA aborts on an unknown flag: add nothing
        assert X.xla_flags_with_defaults("--xla_foo=1", untested) == "--xla_foo=1"


def test_xla_defaults_reach_the_backend_of_a_fresh_process():
    """import jaxrefine sets $XLA_FLAGS before JAX's backend starts, XLA accepts it (an unknown flag aborts the
    process), and JAXREFINE_XLA_DEFAULTS=off leaves it alone."""
    from importlib import metadata

    from jaxrefine.core import xla_options as X

    code = "import jaxrefine, jax, jax.numpy as jnp, os; print(float(jax.jit(jnp.sin)(1.0))); print(os.environ.get('XLA_FLAGS', ''))"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", X.ENV_VAR)}
    for extra, expect in (({}, X.xla_flags_with_defaults("", metadata.version("jaxlib"))), ({X.ENV_VAR: "off"}, "")):
        run = subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        value, flags = run.stdout.split("\n")[:2]
        assert float(value) == pytest.approx(0.841471, abs=1e-6) and flags == expect


_ENERGY_SCRIPT = """
import sys
import numpy as np
import jaxrefine
import jax
from jaxrefine.config import load_config
from jaxrefine.problem import build_setup
from jaxrefine.refine.energy import total_energy

model, data, monlib, out = sys.argv[1:]
s = build_setup(model, data, load_config(None, [f"model.monlib={monlib}", "runtime.compilation_cache=off"]))
value, grad = jax.jit(jax.value_and_grad(total_energy))(s.params, s.problem, s.state)
np.savez(out, value=np.asarray(value), xyz=np.asarray(grad.xyz_frac), b=np.asarray(grad.b_raw))
"""


@pytest.mark.slow
def test_energy_and_gradient_agree_with_and_without_the_xla_defaults(tmp_path):
    """The refinement energy and its gradient (5e5z, float32, the fused F_calc and restraint programs) compiled with
    and without jaxrefine's XLA flag agree to float32 rounding: the older emitters compute the same function."""
    from importlib import metadata

    from conftest import dataset_paths, monomer_dir
    from jaxrefine.core import xla_options as X

    if X.xla_flags_with_defaults("", metadata.version("jaxlib")) == "":
        pytest.skip(f"jaxlib {metadata.version('jaxlib')}: jaxrefine sets no XLA flag")
    model_path, data_path = dataset_paths("5e5z")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", X.ENV_VAR)}
    out = {}
    for mode, extra in (("on", {}), ("off", {X.ENV_VAR: "off"})):
        run = subprocess.run([sys.executable, "-c", _ENERGY_SCRIPT, str(model_path), str(data_path), str(monomer_dir()),
                              str(tmp_path / f"{mode}.npz")], env={**env, **extra}, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        out[mode] = np.load(tmp_path / f"{mode}.npz")
    on, off = out["on"], out["off"]
    # measured 2026-12-02: value 8e-8 relative, gradients 3e-6 (xyz) and 7e-8 (B) of their largest component
    assert float(on["value"]) == pytest.approx(float(off["value"]), rel=1e-6)
    for leaf in ("xyz", "b"):  # float32 sums in another order: relative to the largest component
        scale = np.abs(off[leaf]).max()
        assert scale > 0 and np.abs(on[leaf] - off[leaf]).max() < 1e-4 * scale, leaf


def test_heap_is_trimmed_after_every_compilation(tmp_path):
    """enable_compilation_cache installs the trim (core/heap.py): each later compilation calls malloc_trim(0)
    once (a fresh process, so that no earlier test installed it; a fake stands in for glibc's to count calls)."""
    code = f"""
import jax, numpy as np
from jaxrefine.core import cache, heap
calls = []
heap._malloc_trim = lambda: (lambda pad: calls.append(pad))
jax.jit(lambda x: x + 1.0)(np.ones(3, np.float32)).block_until_ready()
n0 = len(calls)  # nothing installed yet
cache.enable_compilation_cache({str(tmp_path / 'c')!r})
cache.enable_compilation_cache({str(tmp_path / 'c')!r})  # idempotent: still one listener
jax.jit(lambda x: x * 3.5 + 2.0)(np.arange(7.0, dtype=np.float32)).block_until_ready()
jax.jit(lambda x: x - 0.5)(np.arange(5.0, dtype=np.float32)).block_until_ready()
print(n0, calls)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "0 [0, 0]", out.stdout + out.stderr


def test_the_heap_is_trimmed_while_a_block_runs_and_not_after(monkeypatch):
    """core.heap.trimming calls malloc_trim(0) every interval on a thread of its own while its block runs, stops
    when the block ends (an exception included), and starts no thread where the C library has no malloc_trim."""
    from jaxrefine.core import heap

    calls = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda: (lambda pad: calls.append(pad)))
    with pytest.raises(RuntimeError):
        with heap.trimming(0.01):
            time.sleep(0.2)
            raise RuntimeError("the block fails")
    n = len(calls)
    assert n >= 3 and set(calls) == {0}
    time.sleep(0.05)
    assert len(calls) == n  # stopped with the block
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    with heap.trimming(0.01):  # by name: other tests' daemon threads may start or end meanwhile
        assert not any(t.name == "jaxrefine-trim" for t in threading.enumerate())


def test_a_program_prepared_in_the_background_compiles_while_the_heap_is_trimmed(tmp_path, monkeypatch, restore_jax_cache):
    """prepare_exported's compilation runs inside core.heap.trimming (the cold run's peak memory, session 35)."""
    import contextlib

    inside = []

    @contextlib.contextmanager
    def recording():
        inside.append("enter")
        yield
        inside.append("exit")

    monkeypatch.setattr(cache, "trimming", recording)
    cache.enable_compilation_cache(str(tmp_path / "c"))
    cache._exported.clear()
    x, w = jax.numpy.arange(3.0), jax.numpy.ones(3)
    future = cache.prepare_exported(_weighted_sum_jit, (x, w), {"power": 7}, "test")
    assert future is not None and future.result(timeout=120) is not None
    assert inside == ["enter", "exit"]


def test_trim_heap_calls_the_c_library_where_it_has_one():
    import platform

    from jaxrefine.core import heap

    assert heap.trim_heap() is (heap._malloc_trim() is not None)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert heap._malloc_trim() is not None


def test_on_device_is_jnp_asarray_without_a_program():
    """core.device.on_device / zeros_on_device give jnp.asarray's / jnp.zeros's array (values, dtype, weak type),
    committed to the default device as the stored programs' outputs are, and trace, lower, compile or load nothing,
    where jnp.asarray of a new shape and dtype runs a program (whether or not the persistent cache is on in this
    worker)."""
    from jaxrefine.core.device import on_device, zeros_on_device

    def any_program(before):
        d = cache.compile_delta(before)
        return d["trace_s"] > 0 or d["lower_s"] > 0 or d["compile_s"] > 0 or d["cache_hits"] + d["cache_misses"] > 0

    rng = np.random.default_rng(3)
    cases = [(rng.normal(size=(13, 3)), np.float32), (np.arange(17, dtype=np.int64), None), (rng.normal(size=11) > 0, None),
             (2.5, np.float32), (rng.normal(size=7) + 1j, np.complex64), ([1, 2, 3], np.int32)]
    for x, dtype in cases:
        before = cache.compile_counters()
        got = on_device(x, dtype)
        assert not any_program(before), x
        ref = jax.numpy.asarray(x, dtype)
        assert (got.dtype, got.weak_type, got.shape) == (ref.dtype, ref.weak_type, ref.shape)
        assert got.committed and got.devices() == {jax.devices()[0]}
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    before = cache.compile_counters()
    z = zeros_on_device((5, 19), np.float32)
    assert not any_program(before)
    ref = jax.numpy.zeros((5, 19), np.float32)
    assert (z.dtype, z.weak_type, z.shape) == (ref.dtype, ref.weak_type, ref.shape) and not np.asarray(z).any()
    before = cache.compile_counters()
    jax.numpy.asarray(rng.normal(size=(23, 5)), np.float32)  # the program on_device avoids
    assert any_program(before)
    on_dev = on_device(np.arange(31.0), np.float32)
    before = cache.compile_counters()
    again = on_device(on_dev, np.float32)  # a device array of the dtype asked for: no program, no trip to the host
    assert not any_program(before) and again.committed and np.array_equal(np.asarray(again), np.arange(31.0))
    assert on_device(on_dev, np.int32).dtype == np.int32
    # a jitted function given the setup's arrays and then a stored program's output (committed) compiles once
    step = jax.jit(lambda a: a * 3.0 + 1.0)
    step(on_device(np.ones(29), np.float32))
    before = cache.compile_counters()
    step(jax.device_put(np.ones(29, np.float32), jax.devices()[0]))
    assert not any_program(before)


_MALLOC_SCRIPT = """
import ctypes, sys
import numpy as np
from jaxrefine.core.malloc_options import apply_malloc_defaults

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
applied = apply_malloc_defaults()
big = np.ones(8 << 20, np.uint8); del big  # freeing an 8 MiB mapping raises glibc's dynamic threshold to 8 MiB
before = libc.mallinfo2().hblks
block = np.ones(2 << 20, np.uint8)  # 2 MiB: its own mapping only while the threshold stays fixed at 1 MiB
print(applied, libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_malloc_defaults_keep_blocks_of_a_mib_and_more_in_their_own_mappings():
    """After apply_malloc_defaults a 2 MiB block gets its own mapping (returned to the system when freed) even after a
    larger block was freed, which raises glibc's dynamic threshold above it; JAXREFINE_MALLOC_DEFAULTS=off leaves
    glibc's default."""
    import ctypes

    from jaxrefine.core import malloc_options as M

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("C library without mallinfo2 (glibc < 2.33)")
    env = {k: v for k, v in os.environ.items() if k != M.ENV_VAR and not k.startswith("MALLOC_")}
    for extra, expect in (({}, "True 1"), ({M.ENV_VAR: "off"}, "False 0")):
        run = subprocess.run([sys.executable, "-c", _MALLOC_SCRIPT], env={**env, **extra}, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.split("\n")[0] == expect


def test_build_setup_keeps_stored_box_classes_only_when_asked(tmp_path, restore_jax_cache, caplog):
    """runtime.reuse_box_classes: off (the default) a model's FFT box classes are its own whatever ran before; on, a
    model of the same atoms whose B fit an earlier setup's stored classes takes them (the same static shapes): here
    the deposited 1va7 after the same model with 20 atoms' B raised by 150 Å²."""
    import dataclasses

    from conftest import dataset_paths, monomer_dir
    from jaxrefine.config import load_config
    from jaxrefine.io.model import read_model
    from jaxrefine.io.reflections import read_reflections
    from jaxrefine.problem import build_setup

    model = read_model(dataset_paths("1va7")[0])
    refl = read_reflections(dataset_paths("1va7")[1])
    hot_b = np.asarray(model.b_iso, float).copy()
    hot_b[:20] += 150.0  # a few atoms far above the rest: a box class of their own
    hot = dataclasses.replace(model, b_iso=hot_b)
    opts = [f"runtime.compilation_cache={tmp_path / 'c'}", f"model.monlib={monomer_dir()}", "refine.adp=iso", "restraints.ncs=off"]

    def classes(m, reuse):
        cfg = load_config(None, opts + [f"runtime.reuse_box_classes={'true' if reuse else 'false'}"])
        sf = build_setup(None, None, cfg, model=m, refl=refl).problem.sf
        return sf.meta.box, [int(a.shape[0]) for a in sf.box_atoms]

    first = classes(hot, True)
    own = classes(model, False)
    assert own != first  # the deposited B: one class of its own
    caplog.clear()
    with caplog.at_level("INFO", logger="jaxrefine"):
        assert classes(model, True) == first
    assert "an earlier run's kept" in caplog.text  # the log says so
    caplog.clear()
    with caplog.at_level("INFO", logger="jaxrefine"):
        assert classes(model, False) == own  # off: the stored classes are not read
    assert "an earlier run's kept" not in caplog.text
