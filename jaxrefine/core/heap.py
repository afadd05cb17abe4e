"""Returning the C heap's free pages to the operating system after each XLA compilation.

Compiling a program, or loading a compiled one from the persistent cache, parses and rewrites its HLO in
many short-lived allocations, most of them on XLA's worker threads.  glibc keeps the freed memory in those
threads' malloc arenas, so the process's resident memory stays at each transient's high-water mark and
later allocations stack on top of it.  ``malloc_trim(0)`` hands the free pages of every arena back
(glibc >= 2.8; the ~100 trims of a refinement took 12-18 ms in all, 4xof and 5e5z).  Trimming after
every backend compilation (a :mod:`jax.monitoring` event) lowered the peak RSS of warm refinements:
5e5z 475 -> 439 MB, 4xof 628 -> 553 MB (three runs each), 5orl 845 -> 745-760 MB; cold 5kzb 653 -> 589 MB (same
machine, same checkout; benchmarks/README.md).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import threading

import jax

from .malloc_options import libc_function

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # an XLA compilation, or a load from the cache
_installed: list = []


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None (musl, macOS, Windows: nothing to do there)."""
    return libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)


def trim_heap() -> bool:
    """Give the C heap's free pages back to the OS; True where there is a ``malloc_trim`` to call (glibc)."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def _after_compile(event: str, duration: float, **_kw) -> None:
    if event == COMPILE_EVENT:
        trim_heap()


def trim_after_compilations() -> bool:
    """Trim the heap after every XLA compilation of this process from now on (idempotent).  False where
    the C library has no ``malloc_trim``."""
    if _malloc_trim() is None:
        return False
    if not _installed:
        jax.monitoring.register_event_duration_secs_listener(_after_compile)
        _installed.append(True)
    return True


# A background compilation's own high-water mark: XLA's compiler threads free their working memory kernel by kernel,
# and JAX then serialises the new executable for the persistent cache (~20 MB on 1va7) before the compile event above
# fires; trimming every TRIM_INTERVAL_S meanwhile keeps the freed pages from stacking under that.  Cold peak RSS
# (/usr/bin/time, session 35): 1va7 449 / 450 / 453 -> 436 / 435 / 435 MB and again 449 / 450 / 455 -> 435 / 436 /
# 436 MB (alternating; totals 16.0 -> 16.2 s and 15.0 -> 14.7 s on average, the L-BFGS program's XLA compile
# 4.31 -> 4.42 s: inside the VM's spread), 1l2h 468 -> 440, 4xof 472 -> 433, 5e5z 382 -> 362 MB.
TRIM_INTERVAL_S = 0.05


@contextlib.contextmanager
def trimming(interval_s: float = TRIM_INTERVAL_S):
    """Trim the heap every ``interval_s`` seconds on a thread of its own while the block runs (see above)."""
    if _malloc_trim() is None:
        yield
        return
    stop = threading.Event()

    def loop():
        while not stop.wait(interval_s):
            trim_heap()

    thread = threading.Thread(target=loop, name="jaxrefine-trim", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
