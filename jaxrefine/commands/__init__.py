"""One module per CLI subcommand (see jaxrefine.cli), and the argparse types they share.

The types make argparse refuse a bad number with a one-line usage error (exit 2), e.g.
``jaxrefine: sf: argument --d-min: must be >= 0.3 Å, got 0``.
"""
from __future__ import annotations

import argparse
import math


def number_at_least(low: float, unit: str = "", integer: bool = False, strict: bool = False):
    """argparse ``type``: a finite number >= ``low`` (> ``low`` when ``strict``), an integer if asked."""
    sign = ">" if strict else ">="

    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if integer else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {sign} {low:g}{' ' + unit if unit else ''}, got {text}")
        return value

    parse.__name__ = "integer" if integer else "number"
    return parse


positive_length = number_at_least(0.0, "Å", strict=True)  # a distance or resolution limit (Å)
count = number_at_least(0, integer=True)  # a number of cycles, steps, residues
