"""The C allocator's settings for jaxrefine's command-line processes (glibc only).

glibc's malloc serves a large block (above its mmap threshold, 128 KiB at start) with its own mapping and
returns it to the system when freed; but each time such a block is freed it raises the threshold to the
block's size (up to 32 MiB), so that later blocks of that size come from the heap, whose freed memory stays
with the process.  A refinement frees and allocates blocks of a few MiB to tens of MiB between macrocycles
(the solvent mask and its transform, host copies of the model and the reflections), and its resident memory
grew by ~100 MB over the run that way (cold 5kzb: 430 MB after the setup, 526 MB at the end).  A fixed
threshold (``mallopt(M_MMAP_THRESHOLD, 1 MiB)``, which also stops the adjustment) keeps every block of
1 MiB and more in its own mapping: measured in benchmarks/README.md.  (:mod:`jaxrefine.core.heap` is the other half:
it hands the heap's free pages back after each XLA compilation, whose many small allocations no threshold keeps
out of the heap.)

``JAXREFINE_MALLOC_DEFAULTS=off`` leaves the allocator alone.  This module imports neither JAX nor numpy.
"""
from __future__ import annotations

import ctypes
import sys

from .xla_options import switched_off

ENV_VAR = "JAXREFINE_MALLOC_DEFAULTS"
M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
MMAP_THRESHOLD_BYTES = 1 << 20


def libc_function(name: str, argtypes: list, restype):
    """The C library's function ``name`` with its signature set, or None where the C library has none (musl has no
    ``mallopt`` or ``malloc_trim``; macOS and Windows neither)."""
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def apply_malloc_defaults() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES (see the module docstring); True when it was set
    (False: switched off, not Linux, or a C library without ``mallopt``)."""
    if switched_off(ENV_VAR) or not sys.platform.startswith("linux"):
        return False
    mallopt = libc_function("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
