"""Run configuration: frozen dataclasses, YAML files and ``--set section.key=value`` overrides.

Every option of ``jaxrefine refine`` lives here with its default.  A run writes its resolved
configuration (``config.yaml``) next to the results so it can be repeated exactly::

    cfg = load_config("configs/default.yaml", overrides=["refine.n_cycles=3", "weights.w_a=2.0"])
"""
from __future__ import annotations

import dataclasses
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
    hydrogens: str = "remove"  # remove | keep
    monlib: str | None = None  # CCP4 monomer library folder; $CLIBD_MON, then the built-in set
    ligands: tuple = ()  # extra restraint dictionaries (CIF files)
    place_rotation: tuple = ()  # MR placement: 3 ZYZ Euler angles (deg) or 9 matrix elements; x' = R x + t
    place_translation: tuple = ()  # MR placement translation t (Å, Cartesian)
    place_translation_frac: tuple = ()  # or t in fractional coordinates of the data's cell


@dataclass(frozen=True)
class RefineConfig:
    strategy: str = "xyz_b"  # rigid | xyz_b | xyz_b_occ
    n_cycles: int = 5  # macrocycles
    target: str = "ml"  # ml | ls
    optimizer: str = "lbfgs"  # lbfgs | adam | sgd
    steps_xyz: int = 25  # optimiser steps per macrocycle and parameter block
    steps_b: int = 15
    steps_occ: int = 10
    steps_rigid: int = 30
    learning_rate: float = 0.02  # for adam/sgd (Å for coordinates; B and occupancy scaled)
    rigid_bodies: str = "chain"  # chain | all | "sel1; sel2; ..." (selection strings)
    rigid_first: bool = False  # run rigid-body macrocycles before xyz_b (molecular replacement start)
    n_rigid_cycles: int = 3
    rigid_d_min: float = 3.0  # Å: rigid-body steps use reflections with d >= this (wider convergence)
    keep_anisou: bool = True  # use the input ANISOU shapes in F_calc (isotropic B refined on top)
    b_min: float = 2.0  # Å², floor of the positive B reparametrisation
    b_max: float = 300.0
    seed: int = 0
    precision: str = "float32"  # float32 (fast; the GPU default) | float64 (needs jax_enable_x64)


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
class SolventConfig:
    r_probe: float = 1.0  # Å, added to van der Waals radii
    r_shrink: float = 0.8  # Å, shrink-back
    update_every: int = 1  # macrocycles between mask rebuilds


@dataclass(frozen=True)
class GuardConfig:
    max_gap: float = 0.07  # warn when R-free - R-work exceeds this
    keep_best: bool = True  # keep the model with the lowest R-free


@dataclass(frozen=True)
class WaterConfig:
    remove_bad: bool = True  # remove waters that drift out of density or clash
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
    plots: bool = False
    ccp4_maps: bool = False


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    weights: WeightConfig = field(default_factory=WeightConfig)
    solvent: SolventConfig = field(default_factory=SolventConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    waters: WaterConfig = field(default_factory=WaterConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


STRATEGIES = ("rigid", "xyz_b", "xyz_b_occ", "xyz", "b")
_CHOICES = {
    ("model", "hydrogens"): ("remove", "keep"),
    ("refine", "strategy"): STRATEGIES,
    ("refine", "target"): ("ml", "ls"),
    ("refine", "optimizer"): ("lbfgs", "adam", "sgd"),
    ("refine", "precision"): ("float32", "float64"),
}


def _coerce(value, template, where: str):
    if isinstance(template, bool):
        if isinstance(value, str):
            if value.lower() in ("true", "yes", "1", "on"):
                return True
            if value.lower() in ("false", "no", "0", "off"):
                return False
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return bool(value)
    if isinstance(template, int) and not isinstance(template, bool):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if isinstance(template, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if isinstance(template, tuple):
        if isinstance(value, str):
            return tuple(v for v in value.split(",") if v)
        return tuple(value or ())
    if value in ("null", "None", "none", ""):
        return None
    if isinstance(value, str):
        try:
            return float(value) if "." in value or value.isdigit() else value
        except ValueError:
            return value
    return value


def _section_from_dict(cls, values: dict, name: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    default = cls()
    kwargs = {}
    for key, val in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {name}.{key}; known keys: {', '.join(known)}")
        kwargs[key] = _coerce(val, getattr(default, key), f"{name}.{key}") if val is not None else None
        choices = _CHOICES.get((name, key))
        if choices and kwargs[key] not in choices:
            raise ConfigError(f"{name}.{key} = {kwargs[key]!r}; choose one of {', '.join(choices)}")
    return cls(**kwargs)


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
    d = {k: dict(v or {}) for k, v in (d or {}).items()}
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. refine.n_cycles=3")
        key, val = item.split("=", 1)
        if "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. refine.n_cycles=3")
        sec, k = key.strip().split(".", 1)
        d.setdefault(sec, {})[k] = yaml.safe_load(val)
    return d


def load_config(path=None, overrides=()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    d = {}
    if path:
        try:
            with open(path) as fh:
                d = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    try:
        return config_from_dict(apply_overrides(d, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{path or 'defaults'}: {exc}") from None


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
