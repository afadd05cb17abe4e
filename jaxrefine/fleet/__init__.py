"""Fleets: many datasets refined in one command on Dask, never worse than their input.

``refine_many(entries, out_dir, client=None, ...)`` (also ``jaxrefine.refine_many`` and
``jaxrefine batch MANIFEST --out DIR``) runs the normal engine on every entry of a manifest, one
Dask task each, and writes ``DIR/<id>/`` per entry plus ``DIR/results.csv`` and ``DIR/results.md``.
"""
from .driver import refine_many  # noqa: F401
from .manifest import Entry, read_manifest  # noqa: F401
from .worker import KEEP_INPUT_TOLERANCE  # noqa: F401
