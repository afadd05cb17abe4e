"""Writers: models (mmCIF/PDB), reflections + extra columns (MTZ), JSON, text.

Every writer goes through :func:`atomic_write`: a temporary file in the target folder, then
``os.replace``; files get the user's umask (normally 0644).  Writing onto an input file is
refused (``protect`` lists the inputs).  A command that writes several files stages them with
:func:`staged_output`: all files go to a temporary folder beside the target and are moved into
place together at the end, so a failed or interrupted run leaves the previous results intact.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile

import gemmi
import numpy as np

from ..errors import InputError
from .crystal_io import gemmi_cell, gemmi_space_group
from .tls import set_tls_groups, tls_pdb_remarks

_PROTECTED: set[str] = set()


def protect(*paths) -> None:
    """Register input files that no writer may overwrite."""
    for p in paths:
        if p:
            _PROTECTED.add(os.path.realpath(os.fspath(p)))


def check_not_input(path) -> None:
    """Refuse (before any work) an output path that is one of the protected inputs."""
    path = os.fspath(path)
    if os.path.realpath(path) in _PROTECTED:
        raise InputError(f"{path}: refusing to overwrite an input file; choose another output name")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder; give a file name for this output")


_check_target = check_not_input


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask sets it, which
    would race with other threads creating files)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path, mode: int = 0o666) -> None:
    """Give a file created by ``tempfile`` (mode 0600/0700) the permissions of a normal ``open``."""
    os.chmod(path, mode & ~_umask())


def check_output_folder(out_dir, names, inputs=()) -> None:
    """Refuse, before any work, an output folder that cannot take the results.

    Args:
        out_dir: the folder the command will write.
        names: file names the command writes into it.
        inputs: input files; none may be one of the outputs.

    Raises:
        InputError: ``out_dir`` is a file, its parent cannot be written, or an output would
            overwrite an input.
    """
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"{out_dir}: --out exists and is not a folder; choose a folder name")
    parent = os.path.dirname(os.path.abspath(out_dir))
    while not os.path.exists(parent):  # missing parents are created: the nearest existing one must be writable
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{out_dir}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.isdir(out_dir) and not os.access(out_dir, os.W_OK | os.X_OK)):
        raise InputError(f"{out_dir}: permission denied (cannot write there); choose another --out")
    ins = {os.path.realpath(os.fspath(p)) for p in inputs if p}
    for name in names:
        target = os.path.join(out_dir, name)
        if os.path.realpath(target) in ins:
            raise InputError(f"{target}: an input file would be overwritten by the output {name}; choose another --out")


@contextlib.contextmanager
def staged_output(out_dir, managed=()):
    """Stage a command's outputs in a temporary folder beside ``out_dir``; move them in on success.

    Yields the staging folder.  On normal exit every file in it replaces its namesake in
    ``out_dir`` (created when missing: then the whole folder is renamed at once), and files
    named in ``managed`` that this run did not write (results of an older run, e.g. a plot)
    are removed, so the folder never mixes two runs.  On an exception the staging folder is
    deleted and ``out_dir`` is left as it was.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent, base = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}.tmp-")
    apply_umask(tmp, 0o777)
    try:
        yield tmp
        if not os.path.exists(out_dir):
            os.rename(tmp, out_dir)
            return
        written = set(os.listdir(tmp))
        for name in sorted(written):
            target = os.path.join(out_dir, name)
            _check_target(target)
            os.replace(os.path.join(tmp, name), target)
        for name in set(managed) - written:
            stale = os.path.join(out_dir, name)
            if os.path.isfile(stale) and os.path.realpath(stale) not in _PROTECTED:
                os.remove(stale)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_write(path, suffix: str = ""):
    """Yield a temporary path in the same folder; on success rename it onto ``path``."""
    path = os.fspath(path)
    _check_target(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix or os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text: str) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)


def write_json(path, obj) -> None:
    """Strict JSON (NaN and infinities written as null)."""
    write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def json_safe(obj):
    """A copy that strict JSON can hold: numpy values to Python, NaN/inf to None."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def updated_structure(model, xyz_cart=None, b_iso=None, occ=None, u_aniso=None, remarks=None, tls=None) -> gemmi.Structure:
    """A clone of ``model.structure`` with new coordinates/B/occupancies (arrays in model order).

    Args:
        model: :class:`jaxrefine.io.model.Model` that was read (its ``structure`` is the template).
        xyz_cart: (n, 3) Å; b_iso: (n,) Å²; occ: (n,).
        u_aniso: (n, 6) Cartesian U or None; when B is given without U, anisotropic records are
            dropped (an isotropic refinement makes them stale).
        remarks: dict of refinement statistics for the header (r_work, r_free, d_min, rms_bond,
            rms_angle, program).
        tls: :class:`jaxrefine.io.tls.TlsGroups` to write (mmCIF ``_pdbx_refine_tls*``, PDB REMARK 3), or None.
    """
    if model.structure is None:
        raise InputError(f"{model.source}: this model has no gemmi structure to write from")
    st = model.structure.clone()
    xyz = model.xyz_cart if xyz_cart is None else np.asarray(xyz_cart, float)
    b = None if b_iso is None else np.asarray(b_iso, float)
    q = None if occ is None else np.asarray(occ, float)
    i = 0
    for ch in st[0]:
        for res in ch:
            for a in res:
                a.pos = gemmi.Position(*xyz[i])
                if b is not None:
                    a.b_iso = float(b[i])
                    if u_aniso is None:
                        a.aniso = gemmi.SMat33f(0, 0, 0, 0, 0, 0)
                if u_aniso is not None:
                    u = u_aniso[i]
                    a.aniso = gemmi.SMat33f(*[float(v) for v in u])
                if q is not None:
                    a.occ = float(q[i])
                i += 1
    if i != model.n_atoms:
        raise InputError(f"{model.source}: structure has {i} atoms but the arrays have {model.n_atoms}")
    st.cell = gemmi_cell(model.crystal)
    st.spacegroup_hm = gemmi_space_group(model.crystal).hm
    if remarks:
        _set_refinement_meta(st, remarks)
    if tls is not None:
        set_tls_groups(st, model, tls)
        st.raw_remarks = list(st.raw_remarks) + tls_pdb_remarks(model, tls)
    return st


def _set_refinement_meta(st: gemmi.Structure, r: dict) -> None:
    st.meta.software = [s for s in st.meta.software if s.name.lower() != "jaxrefine"]
    sw = gemmi.SoftwareItem()
    sw.name = "jaxrefine"
    sw.version = str(r.get("version", ""))
    sw.classification = gemmi.SoftwareItem.Classification.Refinement
    st.meta.software.append(sw)
    ref = gemmi.RefinementInfo()
    ref.id = "1"
    if r.get("r_work") is not None:
        ref.r_work = float(r["r_work"])
    if r.get("r_free") is not None:
        ref.r_free = float(r["r_free"])
    if r.get("d_min") is not None:
        ref.resolution_high = float(r["d_min"])
    if r.get("d_max") is not None:
        ref.resolution_low = float(r["d_max"])
    restr = []
    for key, name in (("rms_bond", "r_bond_refined_d"), ("rms_angle", "r_angle_refined_deg")):
        if r.get(key) is not None:
            item = gemmi.RefinementInfo.Restr(name)
            item.dev_ideal = float(r[key])
            if r.get("n_" + key[4:] + "s") is not None:
                item.count = int(r["n_" + key[4:] + "s"])
            restr.append(item)
    ref.restr_stats = restr
    st.meta.refinement = [ref]
    if r.get("d_min") is not None:
        st.resolution = float(r["d_min"])
    st.raw_remarks = _pdb_remarks(r)


def _pdb_remarks(r: dict) -> list:
    """REMARK 2/3 lines (PDB format v3.3, REMARK 3 refinement template) with jaxrefine's statistics."""
    lines = []
    if r.get("d_min") is not None:
        lines += ["REMARK   2", f"REMARK   2 RESOLUTION. {r['d_min']:7.2f} ANGSTROMS."]
    lines += ["REMARK   3", "REMARK   3 REFINEMENT.", f"REMARK   3   PROGRAM     : JAXREFINE {r.get('version', '')}".rstrip(),
              "REMARK   3", "REMARK   3  DATA USED IN REFINEMENT."]  # readers (gemmi) start a refinement record here
    fmt = {
        "d_min": "REMARK   3   RESOLUTION RANGE HIGH (ANGSTROMS) : {:.2f}",
        "d_max": "REMARK   3   RESOLUTION RANGE LOW  (ANGSTROMS) : {:.2f}",
        "r_work": "REMARK   3   R VALUE            (WORKING SET) : {:.4f}",
        "r_free": "REMARK   3   FREE R VALUE                     : {:.4f}",
        "rms_bond": "REMARK   3   BOND LENGTHS REFINED ATOMS        (A) : {:.4f}",
        "rms_angle": "REMARK   3   BOND ANGLES REFINED ATOMS   (DEGREES) : {:.3f}",
    }
    for key, f in fmt.items():
        if r.get(key) is not None:
            lines.append(f.format(float(r[key])))
    return [ln.ljust(80) + "\n" for ln in lines]


def write_structure(st: gemmi.Structure, path) -> None:
    """Write mmCIF (``.cif``) or PDB (``.pdb``) atomically."""
    path = os.fspath(path)
    low = path.lower().removesuffix(".gz")
    with atomic_write(path, suffix=".cif" if low.endswith(".cif") else ".pdb") as tmp:
        if low.endswith((".cif", ".mmcif")):
            st.setup_entities()
            doc = st.make_mmcif_document()
            doc.write_file(tmp)
        else:
            st.write_pdb(tmp)


def write_model(model, path, **updates) -> None:
    """Write ``model`` (with optional updated arrays, see :func:`updated_structure`) to mmCIF or PDB."""
    write_structure(updated_structure(model, **updates), path)


def write_mtz(path, crystal, hkl, columns: dict, title: str = "jaxrefine") -> None:
    """Write an MTZ with H K L and the given columns.

    Args:
        crystal: :class:`jaxrefine.core.crystal.Crystal`.
        hkl: (n, 3) int.
        columns: ordered mapping label -> (type, (n,) array); types as in MTZ ('F', 'Q', 'P' in
            degrees, 'I', 'W', 'J').  Complex arrays given with type 'FP' are split into an
            amplitude column ``label`` and a phase column ``PH`` + label (or the label given as
            ``"FWT/PHWT"``).
    """
    mtz = gemmi.Mtz(with_base=True)
    mtz.title = title
    mtz.spacegroup = gemmi_space_group(crystal)
    mtz.set_cell_for_all(gemmi_cell(crystal))
    mtz.add_dataset("jaxrefine")
    data = [np.asarray(hkl, float)]
    for label, (ctype, arr) in columns.items():
        arr = np.asarray(arr)
        if ctype == "FP":
            lab_f, lab_p = label.split("/") if "/" in label else (label, "PH" + label)
            mtz.add_column(lab_f, "F")
            mtz.add_column(lab_p, "P")
            data += [np.abs(arr)[:, None], np.degrees(np.angle(arr))[:, None]]
        else:
            mtz.add_column(label, ctype)
            data.append(np.asarray(arr, float)[:, None])
    mtz.set_data(np.hstack(data).astype(np.float32))
    with atomic_write(path, suffix=".mtz") as tmp:
        mtz.write_to_file(tmp)
