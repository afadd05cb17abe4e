"""Reading observed reflections (MTZ, PDB structure-factor mmCIF) through gemmi.

Columns are picked automatically (amplitudes preferred, intensities converted by French–Wilson,
anomalous pairs merged) or given explicitly with ``labin="FP,SIGFP[,FREE]"``.  R-free flags
are read with the convention detected (CCP4: 0 = free; PHENIX/deposition: 1 = free) or
generated reproducibly.  Reflections with NaN, negative sigma, negative amplitude, hkl = 000 or
systematic absence are removed and counted.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace

import gemmi
import numpy as np

from ..core.crystal import Crystal, centric_flags, d_spacing, epsilon_factors, symmetry_equivalents, systematically_absent
from ..errors import DataMismatchError, InputError
from .french_wilson import french_wilson
from .crystal_io import crystal_from_gemmi

log = logging.getLogger(__name__)

AMPLITUDE_LABELS = ("FP", "FOBS", "F", "F-obs", "FMEAN", "F_meas_au", "F-obs-filtered", "FO", "F_OBS", "FOSC")
INTENSITY_LABELS = ("IMEAN", "I", "IOBS", "I-obs", "I_meas", "IO", "I_OBS", "intensity_meas")
FREE_LABELS = ("FREE", "FreeR_flag", "R-free-flags", "FREER", "FreeRflag", "RFREE", "FREE_FLAG", "status")
CALC_LIKE = ("FC", "FWT", "DELFWT", "FC_ALL", "FC_ALL_LS", "FCALC", "FMODEL", "F-model", "FOM", "2FOFCWT", "FOFCWT")
SIGMA_PREFIXES = ("SIG", "SIG_", "SIGMA", "SIGMA_", "SIGF_")
# MTZ column types each role accepts (CCP4 MTZ format: F amplitude, J intensity, G/K anomalous
# F/I, Q standard deviation, L/M anomalous sigmas, I integer)
VALUE_TYPES = {"F": "F", "J": "I", "G": "F", "K": "I"}
SIGMA_TYPES = ("Q", "L", "M")
FREE_TYPES = ("I",)
MIN_FREE = 10  # fewer free reflections than this give an R-free that means nothing: refused
FEW_FREE = 50  # ... fewer than this: a loud warning (R-free noise ~ 1/sqrt(n_free))
MIN_D = 0.3  # Å: reflections beyond this resolution do not come from an X-ray experiment (damaged file or cell)


@dataclass(frozen=True, eq=False)
class Reflections:
    """Observed data, cleaned, one row per unique reflection.

    Attributes:
        hkl: (n, 3) int Miller indices.
        f_obs: (n,) amplitudes; sig_f_obs: (n,) their sigmas.
        free: (n,) bool, True for the test (free) set.
        d: (n,) resolution (Å).
        centric: (n,) bool; epsilon: (n,) int statistical weights.
        crystal: cell and symmetry of the data file.
        source: path read.
        columns: labels used, e.g. {"F": "FP", "SIGF": "SIGFP", "FREE": "FREE"} (or "I"/"SIGI").
        free_convention: "ccp4 (0 = free)", "phenix (1 = free)", "value N = free" or "generated (5.0%, seed 0)".
        from_intensities: amplitudes came from French–Wilson.
        n_removed: counts of reflections removed, by reason.
    """

    hkl: np.ndarray
    f_obs: np.ndarray
    sig_f_obs: np.ndarray
    free: np.ndarray
    d: np.ndarray
    centric: np.ndarray
    epsilon: np.ndarray
    crystal: Crystal
    source: str = ""
    columns: dict = field(default_factory=dict)
    free_convention: str = ""
    from_intensities: bool = False
    n_removed: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.hkl.shape[0])

    @property
    def n_free(self) -> int:
        return int(self.free.sum())

    @property
    def n_work(self) -> int:
        return self.n - self.n_free

    @property
    def d_min(self) -> float:
        return float(self.d.min())

    @property
    def d_max(self) -> float:
        return float(self.d.max())

    @property
    def s2(self) -> np.ndarray:
        return 1.0 / self.d**2

    def take(self, mask: np.ndarray) -> "Reflections":
        """A copy with only the selected reflections."""
        mask = np.asarray(mask)
        arrays = {
            k: getattr(self, k)[mask]
            for k in ("hkl", "f_obs", "sig_f_obs", "free", "d", "centric", "epsilon")
        }
        return replace(self, **arrays)

    def cut(self, d_min: float | None = None, d_max: float | None = None) -> "Reflections":
        """Resolution cut-offs (Å)."""
        keep = np.ones(self.n, bool)
        if d_min:
            keep &= self.d >= d_min - 1e-9
        if d_max:
            keep &= self.d <= d_max + 1e-9
        if not keep.any():
            raise InputError(f"{self.source}: no reflections between d_max={d_max} and d_min={d_min} Å")
        return self.take(keep)


def _read_mtz(path: str) -> gemmi.Mtz:
    if not os.path.exists(path):
        raise InputError(f"{path}: reflection file not found")
    low = path.lower()
    try:
        if low.endswith((".cif", ".cif.gz", ".ent", ".ent.gz", ".mmcif", ".mmcif.gz")):
            blocks = gemmi.as_refln_blocks(gemmi.cif.read(path))
            if not blocks:
                raise InputError(f"{path}: no reflection block (_refln loop) in this mmCIF file")
            return gemmi.CifToMtz().convert_block_to_mtz(blocks[0])
        return gemmi.read_mtz_file(path)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read as MTZ or structure-factor mmCIF ({exc})") from exc


def _sigma_for(mtz: gemmi.Mtz, label: str) -> str | None:
    names = {c.label for c in mtz.columns}
    for pre in SIGMA_PREFIXES:
        if pre + label in names:
            return pre + label
    if label.startswith("F") and "SIG" + label[1:] in names:
        return "SIG" + label[1:]
    for c in mtz.columns:  # PDB sf-cif style: F_meas_au / F_meas_sigma_au
        if c.type == "Q" and c.label.replace("sigma_", "") == label:
            return c.label
    return None


def _auto_columns(mtz: gemmi.Mtz, path: str):
    labels = [c.label for c in mtz.columns]
    types = {c.label: c.type for c in mtz.columns}

    def pick(preferred, col_type):
        for lab in preferred:
            if lab in types and types[lab] == col_type and _sigma_for(mtz, lab):
                return lab
        for lab in labels:
            if types[lab] == col_type and lab not in CALC_LIKE and _sigma_for(mtz, lab):
                return lab
        return None

    f = pick(AMPLITUDE_LABELS, "F")
    if f:
        return "F", f, _sigma_for(mtz, f)
    i = pick(INTENSITY_LABELS, "J")
    if i:
        return "I", i, _sigma_for(mtz, i)
    for kind, t_pos, t_sig in (("F", "G", "L"), ("I", "K", "M")):
        pos = [c.label for c in mtz.columns if c.type == t_pos and "(+)" in c.label]
        for p in pos:
            m = p.replace("(+)", "(-)")
            sp, sm = _sigma_for(mtz, p), _sigma_for(mtz, m)
            if m in types and sp and sm:
                return kind + "anom", (p, m), (sp, sm)
    raise InputError(
        f"{path}: no amplitude or intensity column with a sigma (found {' '.join(labels)}); "
        f"pass labin='FP,SIGFP' (CLI: --labin FP,SIGFP)"
    )


def _check_labin_types(mtz: gemmi.Mtz, parts: list, path: str, labin: str) -> str:
    """'F' or 'I' from the type of the first labin column; InputError when a column's MTZ type
    does not fit its role (value, sigma, free flag), e.g. labels given in the wrong order."""
    types = {c.label: c.type for c in mtz.columns}
    listing = " ".join(f"{c.label}({c.type})" for c in mtz.columns)
    val, sig = parts[0], parts[1]
    if types[val] not in VALUE_TYPES:
        raise InputError(f"{path}: labin={labin!r}: first column {val!r} has MTZ type {types[val]}, not an amplitude (F) "
                         f"or intensity (J); give the value, then its sigma, then the free flags (columns: {listing})")
    if types[sig] not in SIGMA_TYPES:
        raise InputError(f"{path}: labin={labin!r}: second column {sig!r} has MTZ type {types[sig]}, not a sigma (Q); "
                         f"give the value, then its sigma, then the free flags (columns: {listing})")
    if len(parts) > 2 and types[parts[2]] not in FREE_TYPES:
        raise InputError(f"{path}: labin={labin!r}: third column {parts[2]!r} has MTZ type {types[parts[2]]}, not "
                         f"free-R flags (I); give the value, then its sigma, then the free flags (columns: {listing})")
    return VALUE_TYPES[types[val]]


def _free_column(mtz: gemmi.Mtz, label: str | None, path: str) -> str | None:
    names = [c.label for c in mtz.columns]
    if label:
        if label not in names:
            raise InputError(f"{path}: free-flag column {label!r} not found (found {' '.join(names)})")
        return label
    for lab in FREE_LABELS:
        if lab in names:
            return lab
    for c in mtz.columns:
        if c.type == "I" and "free" in c.label.lower():
            return c.label
    return None


def detect_free_convention(flags: np.ndarray, free_value: int | None = None):
    """Which flag value marks the free set.

    CCP4 files hold many values (0..19) with 0 = free.  Files with two values are ambiguous
    (PHENIX/deposition: 1 = free; CCP4 with two values: 0 = free), so the rarer value is taken
    as free.  ``free_value`` overrides the detection.

    Returns:
        (free mask, description)
    """
    valid = ~np.isnan(flags)
    vals, counts = np.unique(flags[valid].astype(int), return_counts=True)
    if free_value is not None:
        return valid & (flags == free_value), f"value {free_value} = free (given)"
    if len(vals) > 2:
        return valid & (flags == 0), "ccp4 (0 = free)"
    if len(vals) == 2:
        v = int(vals[np.argmin(counts)])
        conv = {0: "ccp4 (0 = free)", 1: "phenix (1 = free)"}.get(v, f"value {v} = free")
        return valid & (flags == v), conv
    return np.zeros_like(valid), "none (one flag value only)"


def generate_free_flags(hkl: np.ndarray, fraction: float = 0.05, seed: int = 0) -> np.ndarray:
    """A reproducible free set of exactly round(fraction * n) reflections.

    The choice depends only on the set of hkl (sorted lexicographically), the fraction and the seed,
    not on the file order.
    """
    if not 0 < fraction < 1:
        raise InputError(f"free-set fraction must be in (0, 1), got {fraction}")
    n = hkl.shape[0]
    order = np.lexsort((hkl[:, 2], hkl[:, 1], hkl[:, 0]))
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(n)[: int(round(fraction * n))]
    free = np.zeros(n, bool)
    free[order[chosen]] = True
    return free


def read_reflections(
    path: str | os.PathLike,
    labin: str | None = None,
    free_label: str | None = None,
    free_value: int | None = None,
    free_fraction: float = 0.05,
    free_seed: int = 0,
    d_min: float | None = None,
    d_max: float | None = None,
) -> Reflections:
    """Read observed data from MTZ or structure-factor mmCIF.

    Args:
        path: reflection file.
        labin: "F,SIGF[,FREE]" or "I,SIGI[,FREE]" column labels; picked automatically when None.
        free_label: free-flag column (auto when None; generated when the file has none).
        free_value: flag value that marks the free set (auto-detected when None).
        free_fraction, free_seed: for a generated free set.
        d_min, d_max: resolution limits (Å).

    Raises:
        InputError: missing file, missing columns, nothing left after cleaning.
    """
    path = os.fspath(path)
    mtz = _read_mtz(path)
    crystal = crystal_from_gemmi(mtz.cell, mtz.spacegroup, path)
    names = [c.label for c in mtz.columns]
    if labin:
        parts = [p.strip() for p in labin.split(",") if p.strip()]
        for p in parts:
            if p not in names:
                raise InputError(f"{path}: column {p!r} from labin={labin!r} not found (found {' '.join(names)})")
        if len(parts) < 2:
            raise InputError(f"{path}: labin needs at least two labels (value and sigma), got {labin!r}")
        val, sig = parts[0], parts[1]
        kind = _check_labin_types(mtz, parts, path, labin)
        if len(parts) > 2:
            free_label = parts[2]
    else:
        kind, val, sig = _auto_columns(mtz, path)
    hkl = np.array(mtz.make_miller_array(), dtype=np.int32)
    col = lambda lab: np.array(mtz.column_with_label(lab).array, dtype=float)  # noqa: E731
    if kind.endswith("anom"):
        vp, vm, sp, sm = col(val[0]), col(val[1]), col(sig[0]), col(sig[1])
        both = ~np.isnan(vp) & ~np.isnan(vm)
        x = np.where(both, 0.5 * (vp + vm), np.where(np.isnan(vp), vm, vp))
        sx = np.where(both, 0.5 * np.sqrt(sp**2 + sm**2), np.where(np.isnan(vp), sm, sp))
        kind = kind[0]
        columns = {kind: f"{val[0]}/{val[1]} (Friedel mates merged)", "SIG" + kind: f"{sig[0]}/{sig[1]}"}
    else:
        x, sx = col(val), col(sig)
        columns = {kind: val, "SIG" + kind: sig}
    removed = {}
    keep = ~np.isnan(x) & ~np.isnan(sx)
    removed["missing (NaN)"] = int((~keep).sum())
    infinite = keep & ~(np.isfinite(x) & np.isfinite(sx))
    removed["infinite value"] = int(infinite.sum())
    keep &= ~infinite
    bad_sig = keep & (sx < 0)
    removed["negative sigma"] = int(bad_sig.sum())
    keep &= ~bad_sig
    if kind == "F":
        neg = keep & (x < 0)
        removed["negative amplitude"] = int(neg.sum())
        keep &= ~neg
    zero = np.all(hkl == 0, axis=1)
    removed["hkl 000"] = int((keep & zero).sum())
    keep &= ~zero
    absent = systematically_absent(hkl, crystal)
    removed["systematic absence"] = int((keep & absent).sum())
    keep &= ~absent

    flabel = _free_column(mtz, free_label, path)
    if flabel is not None:
        flags = col(flabel)
        free_all, convention = detect_free_convention(flags, free_value)
        removed["no free flag"] = int((keep & np.isnan(flags)).sum())
        keep &= ~np.isnan(flags)
        columns["FREE"] = flabel
    else:
        free_all, convention = None, f"generated ({100 * free_fraction:.1f}%, seed {free_seed})"
    d = d_spacing(hkl, crystal)
    if d_min:
        removed[f"d < {d_min}"] = int((keep & (d < d_min - 1e-9)).sum())
        keep &= d >= d_min - 1e-9
    if d_max:
        removed[f"d > {d_max}"] = int((keep & (d > d_max + 1e-9)).sum())
        keep &= d <= d_max + 1e-9
    if not keep.any():
        raise InputError(f"{path}: no reflections left after cleaning ({removed}); check the columns and resolution limits")
    if d[keep].min() < MIN_D or not np.isfinite(d[keep]).all():
        worst = hkl[keep][np.argmin(d[keep])]
        raise InputError(f"{path}: reflection {tuple(int(v) for v in worst)} has d = {d[keep].min():.3f} Å (< {MIN_D} Å): "
                         f"the file is damaged or its cell is wrong; check the file with a CCP4 tool (mtzdump)")
    hkl, x, sx, d = hkl[keep], x[keep], sx[keep], d[keep]
    free_in = free_all[keep] if free_all is not None else None
    hkl, x, sx, d, free_in, n_merged = merge_duplicates(hkl, x, sx, d, free_in, crystal)
    removed["duplicates merged"] = n_merged
    if n_merged:
        log.warning("%s: %d reflections were listed more than once (symmetry-equivalent hkl); merged by "
                    "inverse-variance weighted mean", path, n_merged)
    if free_in is not None:
        free = free_in
    else:
        free = generate_free_flags(hkl, free_fraction, free_seed)
        log.info("%s: no free-R flag column: generated a free set of %d of %d reflections (%.1f%%, seed %d); keep "
                 "the same set in later runs (data.free_fraction, data.free_seed)", path, int(free.sum()), len(free),
                 100 * free_fraction, free_seed)
    _check_free_set(free, path, convention)
    centric = centric_flags(hkl, crystal)
    eps = epsilon_factors(hkl, crystal)
    if kind == "I":
        zero_sig = sx <= 0
        sx = np.where(zero_sig, np.maximum(1e-3 * np.abs(x), 1e-6), sx)
        f, sf = french_wilson(x, sx, centric, eps, 1.0 / d**2)
    else:
        f, sf = x, sx
    removed = {k: v for k, v in removed.items() if v}
    if removed:
        log.info("%s: removed %s reflections (%s)", path, sum(removed.values()), ", ".join(f"{k}: {v}" for k, v in removed.items()))
    return Reflections(
        hkl=hkl, f_obs=f, sig_f_obs=sf, free=free, d=d, centric=centric, epsilon=eps, crystal=crystal,
        source=path, columns=columns, free_convention=convention, from_intensities=(kind == "I"), n_removed=removed,
    )


def _check_free_set(free: np.ndarray, path: str, convention: str) -> None:
    n_free, n = int(free.sum()), len(free)
    if n_free == n:
        raise InputError(f"{path}: every reflection ({n}) is flagged free ({convention}), leaving no work set; "
                         f"pass the right --free-value (data.free_value)")
    if n_free < MIN_FREE:
        raise InputError(f"{path}: only {n_free} free reflections ({convention}); R-free from fewer than {MIN_FREE} "
                         f"means nothing: extend the resolution (smaller d_min), a larger data.free_fraction, or the right --free-value")
    if n_free < FEW_FREE:
        log.warning("%s: only %d free reflections: R-free is noisy (its standard error is about R-free/sqrt(n_free) "
                    "= %.2f R-free; Tickle et al. 1998)", path, n_free, 1 / np.sqrt(n_free))


def merge_duplicates(hkl, x, sx, d, free, crystal):
    """Merge reflections listed more than once (the same or symmetry-equivalent hkl, Friedel mates
    included).  Values are averaged with inverse-variance weights (plain mean where a sigma is
    0), sigma = 1/sqrt(sum w); a merged reflection is free when any of its copies was.

    Returns:
        (hkl, x, sx, d, free, n_merged) with the first copy's hkl; n_merged = rows removed.
    """
    eq = symmetry_equivalents(hkl, crystal)
    eq = np.concatenate([eq, -eq], axis=0).astype(np.int64) + 2**15  # |h|, |k|, |l| < 32768: one int64 key each
    key = ((eq[..., 0] << 32) | (eq[..., 1] << 16) | eq[..., 2]).max(axis=0)
    _, first, inv, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    if len(first) == len(hkl):
        return hkl, x, sx, d, free, 0
    inv = inv.ravel()
    w = np.where(sx > 0, 1.0 / np.maximum(sx, 1e-30) ** 2, 0.0)
    wsum = np.bincount(inv, w)
    plain = wsum[inv] == 0
    w = np.where(plain, 1.0, w)
    wsum = np.bincount(inv, w)
    xm = np.bincount(inv, w * x) / wsum
    sm = np.where(np.bincount(inv, plain) > 0, np.sqrt(np.bincount(inv, sx**2)) / counts, 1.0 / np.sqrt(wsum))
    fm = None if free is None else np.bincount(inv, free.astype(float)) > 0
    return hkl[first], xm, sm, d[first], fm, int(len(hkl) - len(first))


def read_map_coefficients(path, f_label: str, phi_label: str):
    """(crystal, hkl (n, 3) int, (n,) complex) from an amplitude and a phase (degrees) column."""
    path = os.fspath(path)
    mtz = _read_mtz(path)
    names = [c.label for c in mtz.columns]
    for lab in (f_label, phi_label):
        if lab not in names:
            raise InputError(f"{path}: map-coefficient column {lab!r} not found (found {' '.join(names)})")
    f = np.array(mtz.column_with_label(f_label).array, dtype=float)
    phi = np.radians(np.array(mtz.column_with_label(phi_label).array, dtype=float))
    ok = np.isfinite(f) & np.isfinite(phi)
    hkl = np.array(mtz.make_miller_array(), dtype=np.int32)
    return crystal_from_gemmi(mtz.cell, mtz.spacegroup, path), hkl[ok], (f * np.exp(1j * phi))[ok]


CELL_TOLERANCE = 0.02  # relative, on a b c (typical program tolerance)
CELL_ANGLE_TOLERANCE = 0.5  # degrees, on α β γ


def check_compatible(model_crystal: Crystal, data_crystal: Crystal, model_source: str = "model", data_source: str = "data") -> None:
    """Raise DataMismatchError when space groups differ or cells differ beyond tolerance."""
    if model_crystal.sg_number != data_crystal.sg_number:
        raise DataMismatchError(
            f"{model_source} ({model_crystal.space_group}) and {data_source} ({data_crystal.space_group}): "
            f"space groups differ; reindex the data or fix the model's CRYST1"
        )
    mc, dc = model_crystal.cell, data_crystal.cell
    rel = np.abs(mc[:3] - dc[:3]) / dc[:3]
    dang = np.abs(mc[3:] - dc[3:])
    if np.any(rel > CELL_TOLERANCE) or np.any(dang > CELL_ANGLE_TOLERANCE):
        raise DataMismatchError(
            f"{model_source} cell {tuple(np.round(mc, 3))} and {data_source} cell {tuple(np.round(dc, 3))} differ "
            f"(lengths by up to {100 * rel.max():.1f}%, angles by up to {dang.max():.2f}°; tolerance "
            f"{100 * CELL_TOLERANCE:.0f}% and {CELL_ANGLE_TOLERANCE}°); check that model and data belong together"
        )
