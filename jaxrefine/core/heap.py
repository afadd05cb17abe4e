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

import ctypes
import functools

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
