"""XLA options jaxrefine sets for its own processes (before JAX starts its CPU backend).

XLA reads ``$XLA_FLAGS`` once, when the first computation starts the backend, so
:func:`apply_xla_defaults` runs at ``import jaxrefine`` (this module imports neither JAX nor jaxlib).
A process that started JAX's backend before importing jaxrefine keeps its own settings.

``--xla_cpu_use_fusion_emitters=false``: the CPU backend generates code for fused loops with its
older LLVM IR emitters instead of its newer (MLIR-based) fusion emitters.  On the refinement programs this
cuts XLA compilation by 20-45 % with about the same run time (energy value+gradient, jaxlib 0.10.2,
2 cores; compile / evaluation): 1l2h 7.6 -> 4.2 s / 57 -> 54 ms, 5kzb 7.8 -> 5.3 s / 16.6 ->
16.7 ms, 5orl 9.5 -> 6.3 s / 168 -> 185 ms, 4iid 6.8 -> 5.4 s / 204 -> 175 ms.  Cold runs and
the test suite are mostly compilation (benchmarks/README.md).

XLA aborts the process on a flag it does not know, so the flag is only added for jaxlib versions
where it was measured (``TESTED_JAXLIB``); ``$XLA_FLAGS`` naming it already wins, and
``JAXREFINE_XLA_DEFAULTS=off`` leaves ``$XLA_FLAGS`` alone.
"""
from __future__ import annotations

import os

ENV_VAR = "JAXREFINE_XLA_DEFAULTS"
FUSION_FLAG = "--xla_cpu_use_fusion_emitters=false"
TESTED_JAXLIB = ((0, 10),)  # (major, minor) releases where the flag exists and was measured


def _major_minor(version: str):
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def xla_flags_with_defaults(flags: str, jaxlib_version: str | None) -> str:
    """``flags`` ($XLA_FLAGS) with jaxrefine's defaults added where the jaxlib version is tested and the
    flag is not set already."""
    if jaxlib_version is None or _major_minor(jaxlib_version) not in TESTED_JAXLIB:
        return flags
    if FUSION_FLAG.split("=")[0] in flags:
        return flags
    return f"{flags} {FUSION_FLAG}".strip()


def switched_off(env_var: str) -> bool:
    """Whether the environment variable ``env_var`` says off (off, 0, false, no): how a user declines one of
    jaxrefine's process-wide defaults (this one, :mod:`jaxrefine.core.malloc_options`)."""
    return os.environ.get(env_var, "").strip().lower() in ("off", "0", "false", "no")


def apply_xla_defaults() -> None:
    """Set ``$XLA_FLAGS`` for this process and the processes it starts (see the module docstring)."""
    if switched_off(ENV_VAR):
        return
    from importlib import metadata

    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return
    os.environ["XLA_FLAGS"] = xla_flags_with_defaults(os.environ.get("XLA_FLAGS", ""), version)
