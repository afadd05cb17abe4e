"""Run configuration: frozen dataclasses, YAML files and ``--set section.key=value`` overrides.

Every option of ``jaxrefine refine`` lives here with its default.  A run writes its resolved
configuration (``config.yaml``) next to the results so it can be repeated exactly::

    cfg = load_config("configs/default.yaml", overrides=["refine.n_cycles=3", "weights.w_a=2.0"])
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from .errors import ConfigError


@dataclass(frozen=True)
class DataConfig:
    labin: str | None = None  # "FP,SIGFP[,FREE]" or "IMEAN,SIGIMEAN"; automatic when null
    free_value: int | None = None  # flag value of the free set; auto-detected when null
    free_fraction: float = 0.05  # for a generated free set when the file has none
    free_seed: int = 0
    d_min: float | None = None  # Å
    d_max: float | None = None  # Å


@dataclass(frozen=True)
class ModelConfig:
    hydrogens: str = "auto"  # auto (riding below 2.5 Å, else remove) | remove | keep | riding (placed from the
    #                          library, ride on their parents in F_calc)
    monlib: str | None = None  # CCP4 monomer library folder; $CLIBD_MON, then the built-in set
    ligands: tuple = ()  # extra restraint dictionaries (CIF files)
    place_rotation: tuple = ()  # MR placement: 3 ZYZ Euler angles (deg) or 9 matrix elements; x' = R x + t
    place_translation: tuple = ()  # MR placement translation t (Å, Cartesian)
    place_translation_frac: tuple = ()  # or t in fractional coordinates of the data's cell


@dataclass(frozen=True)
class RefineConfig:
    strategy: str = "auto"  # auto (xyz_b_occ below 2.5 Å where the model has alternate conformations or partly
    #                         occupied residues, else xyz_b) | rigid | xyz_b | xyz_b_occ | xyz | b
    n_cycles: int = 5  # macrocycles
    target: str = "ml"  # ml | ls
    optimizer: str = "lbfgs"  # lbfgs | adam | sgd
    steps_xyz: int = 25  # optimiser steps per macrocycle and parameter block
    steps_b: int = 15
    steps_occ: int = 10
    steps_rigid: int = 30
    gn_steps: Any = "auto"  # Gauss-Newton steps (coordinates, and isotropic B when minimised together) at the start of
    #                         each macrocycle's coordinate minimisation, then steps_xyz L-BFGS steps; auto: 4 steps and
    #                         no L-BFGS steps for large isotropic models below 2.5 Å without refined occupancies, else 0
    joint_xyz_b: str = "auto"  # auto (on below 2.5 Å) | on | off: coordinates and B in one minimisation of steps_xyz
    #                            steps instead of steps_xyz + steps_b one after the other
    b_shift_scale: float = 30.0  # Å² of B per Å of coordinate shift in the joint minimisation (its preconditioner)
    learning_rate: float = 0.02  # for adam/sgd (Å for coordinates; B and occupancy scaled)
    converge_rtol: Any = "auto"  # a block stops once a step lowers E by less than this fraction (0: all steps); auto:
    #                             1e-4 where coordinates and B are minimised together (below 2.5 Å), else 1e-5
    converge_shift: float = 0.005  # Å: macrocycles stop (from the third on) once a cycle moves the atoms by less
    #                                than this RMS and w_A has stopped moving (0: always n_cycles)
    rigid_bodies: str = "chain"  # chain | all | "sel1; sel2; ..." (selection strings)
    rigid_first: bool = False  # run rigid-body macrocycles before xyz_b (molecular replacement start)
    n_rigid_cycles: int = 3
    rigid_d_min: float = 3.0  # Å: rigid-body steps use reflections with d >= this (wider convergence)
    rigid_target: str = "ls"  # ml | ls: the X-ray target of rigid-body steps (ls: σA of a misplaced model is ~0)
    keep_anisou: bool = True  # use the input ANISOU shapes in F_calc (isotropic B refined on top)
    b_min: float = 2.0  # Å², floor of the positive B reparametrisation (lower input B are raised to it)
    b_max: float = 300.0  # Å²: a model with B above this is refused (reset B or raise the limit)
    precision: str = "float32"  # float32 (fast; the GPU default) | float64 (needs jax_enable_x64)
    adp: str = "auto"  # iso | aniso | tls | auto (by resolution and data per parameter; the reason is logged)
    tls_groups: str = "auto"  # auto (the input's TLS groups, else one per chain) | chain | "A/1-120; A/121-250"


@dataclass(frozen=True)
class WeightConfig:
    w_a: Any = "auto"  # "auto" or a number: weight of E_geometry relative to E_xray
    target_rmsz_bond: Any = "auto"  # auto w_A steers RMS Z(bond) toward this; "auto": 1.0 at 1.5 Å .. 0.45 at 3.3 Å
    w_b: float = 0.05  # weight of the ADP (B similarity) restraints (1 over-smooths B: R-work rises on 5kzb, 5orl)
    bond: float = 1.0
    angle: float = 1.0
    torsion: float = 1.0
    plane: float = 1.0
    chiral: float = 1.0
    nonbonded: float = 1.0


@dataclass(frozen=True)
class RestraintsConfig:
    ncs: str = "auto"  # auto (local NCS restraints between copies of a chain found by sequence) | off
    ncs_weight: float = 1.0  # weight of the NCS restraints within E_geometry


@dataclass(frozen=True)
class SolventConfig:
    r_probe: float = 1.0  # Å, added to van der Waals radii
    r_shrink: float = 0.8  # Å, shrink-back
    update_every: int = 1  # macrocycles between mask rebuilds (each only once the atoms have moved 0.05 Å RMS or one 0.5 Å)


@dataclass(frozen=True)
class GuardConfig:
    max_gap: float = 0.07  # warn when R-free - R-work exceeds this
    keep_best: bool = True  # keep the latest cycle within 0.001 of the lowest R-free (refine/guard.py)
    keep_input: bool = True  # with keep_best: return the input model when no refined cycle lowers its R-free
    # stop the macrocycles once R-free has risen in this many cycles in a row with w_A settled and an earlier cycle
    # kept (refine/guard.py, stop_for_rising_r_free); 0: every planned cycle runs
    stop_after_rises: int = 2


@dataclass(frozen=True)
class WaterConfig:
    remove_bad: bool = True  # remove waters that drift out of density or clash
    # waters are removed or picked only when the data reach this d_min (Å) or better: phenix's ordered-solvent
    # update stops at 2.8 Å; REFMAC and servalcat never remove waters.  5kzb (3.2 Å) lost 0.004 of R-free when two
    # of its waters went over max_b from the shaken start and were removed
    max_d_min: float = 2.8
    min_density_sigma: float = 0.8  # 2mFo-DFc at the water below this (σ) = out of density
    max_b: float = 100.0  # Å²
    clash_distance: float = 2.2  # Å to any non-water atom
    update_waters: bool = False  # water picking between macrocycles (--update-waters)
    min_peak_sigma: float = 3.5  # new water: mFo-DFc peak height (σ)
    min_two_fofc_sigma: float = 1.0  # ... and 2mFo-DFc at the peak (σ)
    min_hbond: float = 2.4  # Å, hydrogen-bond distance range to a polar atom
    max_hbond: float = 3.4
    min_polar_contact: float = 1.8  # Å, closest allowed N/O contact
    min_water_distance: float = 2.2  # Å between waters
    max_new_fraction: float = 1.0  # at most this × (current waters or residues/2) added per round


@dataclass(frozen=True)
class OutputConfig:
    write_pdb: bool = True
    hydrogens: str = "remove"  # remove | write: riding hydrogens in refined.cif/pdb, placed on the refined atoms
    plots: bool = False
    ccp4_maps: bool = False  # also write 2mFo-DFc and mFo-DFc as CCP4 maps (2fofc.ccp4, fofc.ccp4)
    uncertainties: bool = False  # per-atom esds from the curvature (refined.cif esd columns, metrics.json; slow)


@dataclass(frozen=True)
class RuntimeConfig:
    compilation_cache: Any = "auto"  # auto ($JAXREFINE_CACHE_DIR, else ~/.cache/jaxrefine/jax) | off | a folder
    # the cache folder's size limit (MB): a process that used the folder deletes, when it ends, the least recently
    # used files once it holds more, down to 80 % (core.cache.prune_cache); 0: no limit
    cache_max_mb: float = 2000.0
    # keep the FFT box classes an earlier run of the same atoms stored in the cache folder when this model's atoms fit
    # them (a rerun from the refined model loads the first run's programs); off by default: the classes then depend on
    # what ran before, which moves F_calc at the box truncation's level (~1e-4) and R-free in the 4th decimal
    reuse_box_classes: bool = False
    # the FFT grid, its blur and the form-factor fit made for d_min rounded down to one of this many resolutions per
    # octave (16: 2.83, 2.95, 3.08 Å ...), and the reflections padded to every unique one to that resolution
    # (setup.problem_reflection_count), so that datasets of nearby resolution (a screen's crystals, a rerun with
    # another data.d_min) share compiled programs, at the cost of a grid up to 2^(3/16) = 1.14x finer (5kzb: 54 -> 60
    # points along a and b, 10-15 % per evaluation); 0: made for the data's own d_min; auto: 16 for the entries of
    # refine_many that share a crystal form with others (fleet.driver.entry_configs), else 0
    grid_steps: Any = "auto"
    # cells (a, b, c, α, β, γ) the FFT grid and boxes must also serve, as [[lowest], [highest]]: crystals of one form
    # with slightly different cells then get one layout and share compiled programs; auto: none for one run,
    # the entry's crystal form's range in refine_many (fleet.driver.cell_ranges); []: none
    cell_range: Any = "auto"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    weights: WeightConfig = field(default_factory=WeightConfig)
    restraints: RestraintsConfig = field(default_factory=RestraintsConfig)
    solvent: SolventConfig = field(default_factory=SolventConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    waters: WaterConfig = field(default_factory=WaterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


# Choice lists: defined here once; the CLI and the engine import them from this module.
STRATEGIES = ("rigid", "xyz_b", "xyz_b_occ", "xyz", "b")  # what the macrocycle loop runs
STRATEGY_SETTINGS = ("auto",) + STRATEGIES  # what refine.strategy accepts (auto: chosen per model and data)
TARGETS = ("ml", "ls")
OPTIMIZERS = ("lbfgs", "adam", "sgd")
PRECISIONS = ("float32", "float64")
HYDROGENS = ("auto", "remove", "keep", "riding")
ADP_MODELS = ("iso", "aniso", "tls", "auto")
NCS_MODES = ("auto", "off")
JOINT_MODES = ("auto", "on", "off")
OUTPUT_HYDROGENS = ("remove", "write")
_CHOICES = {
    ("model", "hydrogens"): HYDROGENS,
    ("refine", "strategy"): STRATEGY_SETTINGS,
    ("refine", "target"): TARGETS,
    ("refine", "rigid_target"): TARGETS,
    ("refine", "optimizer"): OPTIMIZERS,
    ("refine", "precision"): PRECISIONS,
    ("refine", "adp"): ADP_MODELS,
    ("refine", "joint_xyz_b"): JOINT_MODES,
    ("restraints", "ncs"): NCS_MODES,
    ("output", "hydrogens"): OUTPUT_HYDROGENS,
}


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _cell_range(v):
    """auto, [] or [[a, b, c, α, β, γ] lowest, [...] highest]: lengths > 0, angles in (0, 180), lowest <= highest."""
    if v == "auto" or (isinstance(v, (list, tuple)) and len(v) == 0):
        return None
    message = "must be auto, [] or [[a, b, c, alpha, beta, gamma] lowest, [...] highest]"
    pair = isinstance(v, (list, tuple)) and len(v) == 2
    if not (pair and all(isinstance(c, (list, tuple)) and len(c) == 6 for c in v)):
        return message
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for c in v for x in c):
        return message
    lo, hi = v
    if not (all(x > 0 for x in lo) and all(x < 180 for x in hi[3:]) and all(a <= b for a, b in zip(lo, hi))):
        return message + ": lengths > 0, angles in (0, 180), lowest <= highest"
    return None


def _non_negative_int_or_auto(v):
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return None
    return "must be a whole number >= 0 or 'auto'"


def _number_or_auto(positive: bool):
    """Check of a finite number > 0 (``positive``) or >= 0, or the word auto."""
    message = f"must be a number {'>' if positive else '>='} 0 or 'auto'"

    def check(v):
        if v == "auto":
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return message
        return None if (v > 0 if positive else v >= 0) else message

    return check


_positive_or_auto = _number_or_auto(positive=True)
_non_negative_or_auto = _number_or_auto(positive=False)


def _length(*allowed):
    def check(v):
        if len(v) not in allowed:
            return f"needs {' or '.join(map(str, allowed))} numbers, got {len(v)}"
        try:
            ok = all(math.isfinite(float(x)) for x in v)
        except (TypeError, ValueError):
            ok = False
        return None if ok else "must be numbers"
    return check


def _fraction(v):
    return None if 0 < v <= 0.5 else "must be in (0, 0.5]"


# (section, key) -> check(value) returning None or what is wrong.  Keys without an entry are
# only type-checked (from the dataclass annotation); add a line here for a new numeric key.
_CHECKS = {
    ("data", "free_fraction"): _fraction,
    ("data", "free_value"): _non_negative,
    ("data", "d_min"): _positive,
    ("data", "d_max"): _positive,
    ("model", "place_rotation"): _length(0, 3, 9),
    ("model", "place_translation"): _length(0, 3),
    ("model", "place_translation_frac"): _length(0, 3),
    ("refine", "n_cycles"): _non_negative,
    ("refine", "steps_xyz"): _non_negative,
    ("refine", "steps_b"): _non_negative,
    ("refine", "steps_occ"): _non_negative,
    ("refine", "steps_rigid"): _non_negative,
    ("refine", "gn_steps"): _non_negative_int_or_auto,
    ("runtime", "grid_steps"): _non_negative_int_or_auto,
    ("runtime", "cache_max_mb"): _non_negative,
    ("runtime", "cell_range"): _cell_range,
    ("refine", "b_shift_scale"): _positive,
    ("refine", "learning_rate"): _positive,
    ("refine", "converge_rtol"): _non_negative_or_auto,
    ("refine", "converge_shift"): _non_negative,
    ("refine", "n_rigid_cycles"): _non_negative,
    ("refine", "rigid_d_min"): _positive,
    ("refine", "b_min"): _non_negative,
    ("refine", "b_max"): _positive,
    ("weights", "w_a"): _positive_or_auto,
    ("weights", "target_rmsz_bond"): _positive_or_auto,
    ("weights", "w_b"): _non_negative,
    ("weights", "bond"): _non_negative,
    ("weights", "angle"): _non_negative,
    ("weights", "torsion"): _non_negative,
    ("weights", "plane"): _non_negative,
    ("weights", "chiral"): _non_negative,
    ("weights", "nonbonded"): _non_negative,
    ("restraints", "ncs_weight"): _non_negative,
    ("solvent", "r_probe"): _non_negative,
    ("solvent", "r_shrink"): _non_negative,
    ("solvent", "update_every"): _positive,
    ("guard", "max_gap"): _non_negative,
    ("guard", "stop_after_rises"): _non_negative,
    ("waters", "max_b"): _positive,
    ("waters", "max_d_min"): _positive,
    ("waters", "clash_distance"): _positive,
    ("waters", "min_peak_sigma"): _positive,
    ("waters", "min_hbond"): _positive,
    ("waters", "max_hbond"): _positive,
    ("waters", "min_polar_contact"): _positive,
    ("waters", "min_water_distance"): _positive,
    ("waters", "max_new_fraction"): _non_negative,
}

# (low key, high key): both in one section, low < high when both are set.
_ORDERED = (
    ("data", "d_min", "d_max"),
    ("refine", "b_min", "b_max"),
    ("waters", "min_hbond", "max_hbond"),
)


def _coerce(value, annotation: str, where: str):
    """``value`` converted to the type written in the dataclass annotation (e.g. ``int``,
    ``float | None``, ``tuple``, ``Any``); ConfigError naming ``where`` when it does not fit."""
    kind = annotation.replace(" ", "").replace("|None", "")
    optional = "None" in annotation
    if isinstance(value, str) and value.strip().lower() in ("null", "none", "~") and (optional or kind == "Any"):
        value = None
    if value is None:
        if optional or kind == "Any":
            return None
        raise ConfigError(f"{where}: needs a value (null is not allowed)")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "false", "no", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if kind == "float":
        try:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return out
    if kind == "str":
        if isinstance(value, bool):  # YAML reads a bare off/on as a boolean
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected text, got {value!r}")
        return value
    if kind == "tuple":
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if isinstance(value, str):  # Any: a number written as text counts as the number
        try:
            return float(value)
        except ValueError:
            return value.strip()
    return value


def _section_from_dict(cls, values: dict, name: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"config section {name!r} must be a mapping of keys to values, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, val in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {name}.{key}; known keys: {', '.join(known)}")
        where = f"{name}.{key}"
        annotation = known[key].type if isinstance(known[key].type, str) else getattr(known[key].type, "__name__", "Any")
        kwargs[key] = v = _coerce(val, annotation, where)
        choices = _CHOICES.get((name, key))
        if choices and v not in choices:
            raise ConfigError(f"{where} = {v!r}; choose one of {', '.join(choices)}")
        check = _CHECKS.get((name, key))
        problem = check(v) if check is not None and v is not None else None
        if problem:
            raise ConfigError(f"{where} = {v!r}: {problem}; see configs/default.yaml for what it means")
    section = cls(**kwargs)
    for sec, lo, hi in _ORDERED:
        if sec == name:
            a, b = getattr(section, lo), getattr(section, hi)
            if a is not None and b is not None and not a < b:
                raise ConfigError(f"{name}.{lo} = {a} and {name}.{hi} = {b}: {lo} must be smaller than {hi}")
    return section


def config_from_dict(d: dict | None) -> Config:
    """Build a :class:`Config` from nested dicts, validating keys and values."""
    d = d or {}
    known = {f.name: f for f in fields(Config)}
    for key in d:
        if key not in known:
            raise ConfigError(f"unknown config section {key!r}; known sections: {', '.join(known)}")
    return Config(**{name: _section_from_dict(f.default_factory, d.get(name), name) for name, f in known.items()})


def config_to_dict(cfg: Config) -> dict:
    out = dataclasses.asdict(cfg)
    for sec in out.values():
        for k, v in sec.items():
            if isinstance(v, tuple):
                sec[k] = list(v)
    return out


def apply_overrides(d: dict, overrides) -> dict:
    """Apply ``section.key=value`` strings (YAML-parsed values) to a nested dict."""
    if not isinstance(d or {}, dict):
        raise ConfigError(f"expected a mapping of sections (data:, refine:, ...), got {type(d).__name__} {d!r}")
    d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (d or {}).items()}
    for item in overrides or ():
        key, eq, val = str(item).partition("=")
        sec, dot, k = key.strip().partition(".")
        if not eq or not dot or not sec or not k:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. refine.n_cycles=3")
        if d.get(sec) is None:
            d[sec] = {}
        elif not isinstance(d[sec], dict):
            raise ConfigError(f"config section {sec!r} must be a mapping of keys to values, got {d[sec]!r}")
        try:
            d[sec][k] = yaml.safe_load(val)
        except yaml.YAMLError:
            d[sec][k] = val
    return d


def load_config(path=None, overrides=()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: one line naming the file (or ``--set``) and key, what is wrong and what to do.
    """
    d = {}
    if path:
        try:
            with open(path) as fh:
                d = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found; check the --config path") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder, not a config file; pass a YAML file such as configs/default.yaml") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the config file ({exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
        try:
            config_from_dict(apply_overrides(d, ()))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    try:
        return config_from_dict(apply_overrides(d, overrides))
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith("--set") or not overrides else f"--set {msg}") from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
