"""Fleet manifests: the list of entries to refine, from YAML, CSV or a folder pattern.

An entry is an id, a model file, a data file and its own settings (labin, ligand dictionaries, a
monomer library, any ``section.key=value`` override), merged onto the fleet's shared configuration.

YAML: a list of mappings, or a mapping with ``entries:`` ::

    - {id: apo, model: apo/model.pdb, data: apo/data.mtz}
    - id: lig1
      model: lig1/model.pdb
      data: lig1/data.mtz
      ligands: [lig1/LIG.cif]
      labin: FP,SIGFP,FREE
      set: [refine.n_cycles=8]

CSV: columns ``id,model,data`` and optionally ``labin,ligands,monlib,set`` (several ligand files or
overrides separated by ``;``).

Folder pattern: a glob of model files such as ``screen/*/model.pdb``; the data file is the one
MTZ or structure-factor mmCIF beside each model, the id is the model's folder name.

Relative paths are relative to the manifest's folder.  A missing model or data file is not a
manifest error: that entry fails on its own, with the file named in its row.
"""
from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import asdict, dataclass

import yaml

from ..errors import ConfigError, InputError

KEYS = ("id", "model", "data", "labin", "ligands", "monlib", "set")
DATA_PATTERNS = ("*.mtz", "*.mtz.gz", "*sf.cif", "*sf.cif.gz", "*sf.mmcif", "*sf.mmcif.gz")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Entry:
    """One dataset of a fleet.

    Attributes:
        id: name of the entry and of its output folder ``DIR/<id>/``.
        model, data: input files (absolute paths).
        labin: data columns (``data.labin``), None for automatic.
        ligands: extra restraint dictionaries (``model.ligands``).
        monlib: monomer library folder (``model.monlib``), None for the shared setting.
        overrides: further ``section.key=value`` settings of this entry.
    """

    id: str
    model: str
    data: str
    labin: str | None = None
    ligands: tuple = ()
    monlib: str | None = None
    overrides: tuple = ()

    def config_overrides(self) -> list:
        """This entry's settings as ``--set`` strings, applied after the shared configuration."""
        sets = []
        if self.labin:
            sets.append(f"data.labin={self.labin}")
        if self.monlib:
            sets.append(f"model.monlib={self.monlib}")
        if self.ligands:
            sets.append("model.ligands=[" + ",".join(f"'{x}'" for x in self.ligands) + "]")
        return sets + list(self.overrides)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ligands"], d["overrides"] = list(self.ligands), list(self.overrides)
        return d


def _split(value, sep=";") -> tuple:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(sep) if v.strip())
    return tuple(str(v) for v in value)


def _path(value, base: str) -> str:
    value = os.path.expanduser(str(value))
    return os.path.normpath(value if os.path.isabs(value) else os.path.join(base, value))


def make_entry(row: dict, base: str = ".", where: str = "manifest") -> Entry:
    """An :class:`Entry` from a mapping with the keys of :data:`KEYS` (paths relative to ``base``)."""
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: an entry must be a mapping with id, model, data; got {row!r}")
    unknown = [k for k in row if k not in KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(KEYS)}")
    for key in ("model", "data"):
        if not row.get(key):
            raise ConfigError(f"{where}: entry {row.get('id', '?')!r} has no {key} file")
    eid = str(row.get("id") or "").strip()
    if not _ID.match(eid):
        raise ConfigError(f"{where}: entry id {eid!r} must be a plain name (letters, digits, . _ -): "
                          f"it names the output folder")
    monlib = row.get("monlib")
    return Entry(id=eid, model=_path(row["model"], base), data=_path(row["data"], base),
                 labin=str(row["labin"]) if row.get("labin") else None,
                 ligands=tuple(_path(p, base) for p in _split(row.get("ligands"))),
                 monlib=_path(monlib, base) if monlib else None, overrides=_split(row.get("set")))


def _check_unique(entries: list, where: str) -> list:
    seen = set()
    for e in entries:
        if e.id in seen:
            raise ConfigError(f"{where}: entry id {e.id!r} appears twice; ids name the output folders")
        seen.add(e.id)
    if not entries:
        raise ConfigError(f"{where}: no entries")
    return entries


def _read_yaml(path: str) -> list:
    try:
        with open(path) as fh:
            doc = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    rows = doc.get("entries") if isinstance(doc, dict) else doc
    if not isinstance(rows, list):
        raise ConfigError(f"{path}: expected a list of entries (or 'entries:' with a list)")
    base = os.path.dirname(os.path.abspath(path))
    return [make_entry(r, base, f"{path}: entry {i + 1}") for i, r in enumerate(rows)]


def _read_csv(path: str) -> list:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [k for k in ("id", "model", "data") if k not in (reader.fieldnames or ())]
        if missing:
            raise ConfigError(f"{path}: CSV header needs id,model,data (missing {', '.join(missing)})")
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in reader]
    base = os.path.dirname(os.path.abspath(path))
    return [make_entry(r, base, f"{path}: row {i + 2}") for i, r in enumerate(rows)]


def data_beside(model_path: str) -> str:
    """The one reflection file in the model's folder."""
    folder = os.path.dirname(model_path)
    found = sorted({f for pat in DATA_PATTERNS for f in glob.glob(os.path.join(folder, pat))})
    if len(found) != 1:
        what = "no reflection file (MTZ or *sf.cif)" if not found else f"{len(found)} reflection files"
        raise InputError(f"{folder}: {what} beside {os.path.basename(model_path)}; use a YAML or CSV manifest")
    return found[0]


def _read_pattern(pattern: str) -> list:
    models = sorted(glob.glob(os.path.expanduser(pattern)))
    if not models:
        raise InputError(f"{pattern}: no file matches this manifest pattern")
    return [Entry(id=os.path.basename(os.path.dirname(os.path.abspath(m))) or "entry", model=os.path.abspath(m),
                  data=os.path.abspath(data_beside(m))) for m in models]


def read_manifest(source) -> list:
    """The entries of a manifest: a YAML or CSV file, or a glob pattern of model files.

    Raises:
        ConfigError: malformed manifest (names the file and the entry).
        InputError: no file matches the pattern, or no data file beside a model.
    """
    source = os.fspath(source)
    low = source.lower()
    if os.path.isfile(source) and low.endswith((".yaml", ".yml")):
        entries = _read_yaml(source)
    elif os.path.isfile(source) and low.endswith(".csv"):
        entries = _read_csv(source)
    elif glob.has_magic(source):
        entries = _read_pattern(source)
    elif os.path.exists(source):
        raise ConfigError(f"{source}: a manifest is a .yaml/.yml or .csv file, or a pattern such as 'data/*/model.pdb'")
    else:
        raise InputError(f"{source}: manifest not found")
    return _check_unique(entries, source)


def as_entries(items, base: str = ".") -> list:
    """Entries from Entry objects, mappings (as in a YAML manifest) or a manifest path."""
    if isinstance(items, (str, os.PathLike)):
        return read_manifest(items)
    entries = [e if isinstance(e, Entry) else make_entry(e, base, f"entry {i + 1}") for i, e in enumerate(items)]
    return _check_unique(entries, "entries")
