"""Omit maps: the density of a selection computed without it in the phasing model.

Removing atoms from the model that phases the map removes their contribution to the phases, so the
density that reappears at their place comes from the observed amplitudes (Bhat 1988, J. Appl.
Cryst. 21, 279; Hodel, Kim & Brünger 1992, Acta Cryst. A48, 851).  The bulk-solvent mask is kept
from the full model by default, so that the omitted volume is not flooded with solvent (as in
phenix.polder's opposite choice, Liebschner et al. 2017, Acta Cryst. D73, 148, keeping solvent out
makes weak density stronger).  Optionally the remaining atoms are shaken (coordinate perturbation to
erase the memory of the omitted part, the simulated-annealing-free omit of Hodel et al.) and/or
briefly refined before the map is computed.

A composite omit map (:func:`composite_omit_map`) omits N pieces of the asymmetric unit in turn and
assembles, at every grid point near the model, the omit 2mFo−DFc of the piece nearest to it.
"""
from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from .density import ModelMaps, fit_radius, grid_points_near, model_maps, region_correlation, sample_map

log = logging.getLogger(__name__)


class OmitResult(NamedTuple):
    """An omit map and how the omitted atoms fit it.

    Attributes:
        maps: :class:`ModelMaps` phased by the model without the selection.
        omitted: (n_atoms,) bool mask of the omitted atoms (in the input model).
        rest: the model that phased the maps (selection removed, shaken/refined if asked).
        cc_fofc: correlation of the omit mFo−DFc with the calculated density of the omitted atoms
            over the grid points near them.
        cc_two_fofc: the same for the omit 2mFo−DFc.
        mean_fofc_sigma: mean omit mFo−DFc at the omitted atoms (σ of the map).
        mean_two_fofc_sigma: mean omit 2mFo−DFc at the omitted atoms (σ).
    """

    maps: ModelMaps
    omitted: np.ndarray
    rest: object
    cc_fofc: float
    cc_two_fofc: float
    mean_fofc_sigma: float
    mean_two_fofc_sigma: float


def omit_map(model, refl, selection, keep_solvent_mask: bool = True, shake_rms: float = 0.0, seed: int = 0,
             refine_rest=None, sample_rate: float = 3.0) -> OmitResult:
    """σA-weighted omit maps for a selection.

    Args:
        model: :class:`jaxrefine.io.model.Model`.
        refl: :class:`jaxrefine.io.reflections.Reflections`.
        selection: selection string (``"A/45-52"``, ``"resname ADP"``) or (n_atoms,) bool mask.
        keep_solvent_mask: use the full model's bulk-solvent mask (True) or the rest's (False).
        shake_rms: Å RMS random shift of the remaining atoms before the map (0: none).
        seed: seed of the shake.
        refine_rest: callable ``(rest_model, refl) -> refined rest_model`` run before the map (None: no
            refinement), e.g. ``functools.partial(jaxrefine.refine.engine.refine_briefly, n_cycles=2)``.
        sample_rate: grid spacing ≈ d_min / sample_rate.

    Returns:
        :class:`OmitResult`.
    """
    from ..io.build import with_coordinates
    from ..problem.fmodel import model_f_mask

    mask = model.select(selection) if isinstance(selection, str) else np.asarray(selection, bool)
    rest = model.subset(~mask)
    if shake_rms > 0:
        rng = np.random.default_rng(seed)
        rest = with_coordinates(rest, xyz_cart=rest.xyz_cart + rng.normal(0.0, shake_rms / np.sqrt(3), rest.xyz_cart.shape))
    if refine_rest is not None:
        rest = refine_rest(rest, refl)
    f_mask = model_f_mask(model, refl.crystal, refl.hkl, refl.d_min)[0] if keep_solvent_mask else None
    maps = model_maps(rest, refl, sample_rate=sample_rate, f_mask=f_mask)
    heavy = mask & ~model.is_hydrogen
    xyz = model.xyz_cart[heavy]
    weight = model.atomic_number[heavy] * model.occ[heavy]
    b = model.b_iso[heavy]
    cc_diff, _ = region_correlation(maps.fofc, xyz, weight, b, maps.crystal, maps.d_min)
    cc_two, _ = region_correlation(maps.two_fofc, xyz, weight, b, maps.crystal, maps.d_min)
    frac = maps.crystal.to_frac(xyz)
    at_diff = float(np.mean(sample_map(maps.fofc, frac)) / maps.sigma_diff)
    at_two = float(np.mean(sample_map(maps.two_fofc, frac)) / maps.sigma_two)
    log.info("omit %d atoms: CC(mFo-DFc, calc) %.3f, mean mFo-DFc %.2f sigma", heavy.sum(), cc_diff, at_diff)
    return OmitResult(maps, mask, rest, cc_diff, cc_two, at_diff, at_two)


def split_pieces(model, n_pieces: int) -> np.ndarray:
    """(n_atoms,) piece index 0..n_pieces−1: consecutive residues in file order, about equal atom counts."""
    n_res = model.n_residues
    atoms_per_res = np.bincount(model.res_index, minlength=n_res)
    cum = np.cumsum(atoms_per_res) / max(model.n_atoms, 1)
    piece_of_res = np.minimum((cum * n_pieces - 1e-9).astype(int), n_pieces - 1)
    piece_of_res = np.maximum(piece_of_res, 0)
    return piece_of_res[model.res_index]


def _symmetry_images_of_grid(idx, crystal, shape):
    """(n_ops, m, 3) wrapped grid indices of the symmetry images of grid points idx (m, 3)."""
    shape = np.asarray(shape)
    f = np.asarray(idx, float) / shape[None]
    out = []
    for rot, trans in zip(np.asarray(crystal.rot, float), np.asarray(crystal.trans, float)):
        g = np.rint((f @ rot.T + trans) * shape[None]).astype(np.int64) % shape[None]
        out.append(g)
    return np.stack(out)


def composite_omit_map(model, refl, n_pieces: int = 10, sample_rate: float = 3.0, **omit_kwargs):
    """Composite omit 2mFo−DFc map over the whole asymmetric unit in ``n_pieces`` omits.

    Each grid point within :func:`fit_radius` of a model atom (and its symmetry images) takes the
    value of the omit map of the piece that holds the nearest atom; points elsewhere keep the
    full model's 2mFo−DFc.  Each omit map is scaled to the σ of the full map before assembly.

    Args:
        model, refl: as for :func:`omit_map`.
        n_pieces: pieces of the model (consecutive residues; see :func:`split_pieces`).
        omit_kwargs: passed to :func:`omit_map` (shake_rms, refine_rest, ...).

    Returns:
        ((na, nb, nc) composite 2mFo−DFc map, :class:`ModelMaps` of the full model).
    """
    full = model_maps(model, refl, sample_rate=sample_rate)
    shape = full.two_fofc.shape
    piece = split_pieces(model, n_pieces)
    heavy = ~model.is_hydrogen
    idx, pts = grid_points_near(model.xyz_cart[heavy], full.crystal, shape, fit_radius(full.d_min))
    owner = piece[heavy][cKDTree(model.xyz_cart[heavy]).query(pts)[1]]
    images = _symmetry_images_of_grid(idx, full.crystal, shape)
    out = full.two_fofc.copy()
    for p in range(n_pieces):
        sel = piece == p
        if not sel.any():
            continue
        om = omit_map(model, refl, sel, sample_rate=sample_rate, **omit_kwargs).maps
        if om.two_fofc.shape != shape:
            raise ValueError("omit map grid differs from the full map grid")
        vals = om.two_fofc * (full.sigma_two / om.sigma_two)
        g = images[:, owner == p].reshape(-1, 3)
        out[g[:, 0], g[:, 1], g[:, 2]] = vals[g[:, 0], g[:, 1], g[:, 2]]
    return out, full
