"""Summaries of model and data files (the ``info`` command)."""
from __future__ import annotations

from collections import Counter

from .model import read_model
from .reflections import check_compatible, read_reflections


def summarise(model_path, data_path=None, **data_options) -> dict:
    """A JSON-ready dict describing a model and optionally its reflections.

    Keys: model, n_atoms (hydrogens included), n_hydrogens, n_residues, n_chains, chains,
    atoms_by_element, atoms_by_kind, space_group, sg_number, cell, deposited; with data also
    data, n_reflections, n_work, n_free, d_min, d_max, columns, free_convention,
    from_intensities, removed.
    """
    model = read_model(model_path, hydrogens=True)
    out = {
        "model": str(model_path),
        "n_atoms": model.n_atoms,
        "n_hydrogens": int(model.is_hydrogen.sum()),
        "n_residues": model.n_residues,
        "n_chains": model.n_chains,
        "chains": list(dict.fromkeys(model.chain_id.tolist())),
        "atoms_by_element": dict(Counter(model.element.tolist()).most_common()),
        "atoms_by_kind": dict(Counter(model.kind.tolist()).most_common()),
        "space_group": model.crystal.space_group,
        "sg_number": model.crystal.sg_number,
        "cell": [round(float(v), 4) for v in model.crystal.cell],
        "deposited": {k: v for k, v in model.meta.items()},
    }
    if data_path:
        refl = read_reflections(data_path, **data_options)
        check_compatible(model.crystal, refl.crystal, str(model_path), str(data_path))
        out.update(
            data=str(data_path),
            n_reflections=refl.n,
            n_work=refl.n_work,
            n_free=refl.n_free,
            d_min=round(refl.d_min, 4),
            d_max=round(refl.d_max, 4),
            columns=refl.columns,
            free_convention=refl.free_convention,
            from_intensities=refl.from_intensities,
            removed=refl.n_removed,
        )
    return out
