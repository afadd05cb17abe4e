"""Model bias and validation: per-residue density fit, register shifts, omit maps, water picking.

The functions take a :class:`jaxrefine.io.model.Model` and :class:`jaxrefine.io.reflections.Reflections`
and compute their own maps (no refinement); the CLI commands ``validate`` and ``omit`` are thin
layers over :func:`validate_model` and :func:`jaxrefine.validate.omit.omit_map`.
"""
from __future__ import annotations

from typing import NamedTuple

from .density import ModelMaps, model_maps, residue_fit, sample_map, worst_residues  # noqa: F401
from .register import DEFAULT_SHIFTS, DEFAULT_THRESHOLD, DEFAULT_WINDOW, apply_register_shift, register_maps, scan_register  # noqa: F401


class ValidationResult(NamedTuple):
    """What :func:`validate_model` found.

    Attributes:
        residues: per-residue rows of :func:`jaxrefine.validate.density.residue_fit`.
        register_shifts: flagged segments of :func:`jaxrefine.validate.register.scan_register`.
        worst: the lowest-RSCC residues.
        summary: dict (r_work, r_free of the maps' phasing model, d_min, mean RSCC by kind, ...).
        maps: the 2mFo−DFc / mFo−DFc maps of the model as given.
        register_windows: every scanned window with its CC per shift.
    """

    residues: list
    register_shifts: list
    worst: list
    summary: dict
    maps: ModelMaps
    register_windows: list


def validate_model(model, refl, shifts=DEFAULT_SHIFTS, window: int = DEFAULT_WINDOW,
                   threshold: float = DEFAULT_THRESHOLD, n_worst: int = 10) -> ValidationResult:
    """Per-residue density fit and register-shift scan of a model as given (no refinement).

    Args:
        model: :class:`jaxrefine.io.model.Model` (hydrogens are ignored in the fit).
        refl: its :class:`jaxrefine.io.reflections.Reflections`.
        shifts, window, threshold: see :func:`jaxrefine.validate.register.scan_register`.
        n_worst: residues listed as worst.

    Returns:
        :class:`ValidationResult`.
    """
    import numpy as np

    maps = model_maps(model, refl)
    rows = residue_fit(model, maps)
    scan = scan_register(model, register_maps(model, refl), shifts=shifts, window=window, threshold=threshold)
    summary = {"r_work": maps.r_work, "r_free": maps.r_free, "d_min": maps.d_min, "n_residues": len(rows),
               "register_threshold": threshold, "register_window": window, "register_windows_scanned": len(scan.windows)}
    for kind in ("protein", "nucleic", "ligand", "water"):
        v = [r["rscc"] for r in rows if r["kind"] == kind and r["rscc"] is not None]
        if v:
            summary[f"mean_rscc_{kind}"] = round(float(np.mean(v)), 4)
    return ValidationResult(rows, scan.flags, worst_residues(rows, n_worst), summary, maps, scan.windows)


from .omit import OmitResult, composite_omit_map, omit_map  # noqa: E402,F401
from .waters import bad_waters, pick_waters, update_waters, water_hooks  # noqa: E402,F401
