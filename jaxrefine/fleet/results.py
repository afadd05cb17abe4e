"""The fleet's results table: DIR/results.csv (one row per entry) and DIR/results.md (for reading).

Rows come from each entry's ``DIR/<id>/result.json``; the table is rewritten (atomically) whenever an
entry finishes, so it is complete up to the last finished entry even if the fleet is killed.
"""
from __future__ import annotations

import csv
import io
import json
import os

from ..io.writers import write_text
from .worker import result_path

COLUMNS = ("id", "status", "r_work_in", "r_free_in", "r_work", "r_free", "r_free_refined", "rms_bond", "rms_angle",
           "w_a", "adp", "wall_s", "compile_s", "cache_hits", "model_out", "error")
_DIGITS = {"r_work_in": 4, "r_free_in": 4, "r_work": 4, "r_free": 4, "r_free_refined": 4, "rms_bond": 4,
           "rms_angle": 2, "w_a": 3, "wall_s": 1, "compile_s": 1}


def load_result(out_root: str, entry) -> dict | None:
    """The stored row of ``entry``, or None when it has not finished (or its inputs changed since)."""
    path = result_path(out_root, entry.id)
    try:
        with open(path) as fh:
            rec = json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return rec if rec.get("entry") == entry.as_dict() else None


def _fmt(key, value) -> str:
    if value is None:
        return ""
    if key in _DIGITS and isinstance(value, (int, float)):
        return f"{value:.{_DIGITS[key]}f}"
    return str(value)


def table_csv(records: list) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for rec in records:
        writer.writerow([_fmt(k, rec.get(k)) for k in COLUMNS])
    return buf.getvalue()


def summary_markdown(records: list) -> str:
    """A short readable summary: counts, then the table without file paths."""
    counts = {s: sum(r["status"] == s for r in records) for s in ("refined", "kept input", "failed")}
    cols = ("id", "status", "r_work_in", "r_free_in", "r_work", "r_free", "rms_bond", "rms_angle", "w_a", "wall_s", "error")
    lines = [f"# Fleet results: {len(records)} entries", "",
             f"{counts['refined']} refined, {counts['kept input']} kept input (refined R-free worse), "
             f"{counts['failed']} failed.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join(_fmt(k, r.get(k)).replace("|", "/") for k in cols) + " |")
    return "\n".join(lines) + "\n"


def write_tables(out_root: str, records: list) -> None:
    """Write results.csv and results.md in manifest order (unfinished entries left out)."""
    write_text(os.path.join(out_root, "results.csv"), table_csv(records))
    write_text(os.path.join(out_root, "results.md"), summary_markdown(records))
