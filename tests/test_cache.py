"""Persistent compilation cache: where it lives, switching it off, and a second process hitting it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
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
