"""Maps on grids, density at points, and the per-residue fit of a model to its map.

Everything here is numpy outside any gradient: validation reads maps, it does not refine them.

* :func:`model_maps`: σA-weighted 2mFo−DFc and mFo−DFc maps of a model as given (the phases are
  the model's own, hence model-biased; Read 1986, Acta Cryst. A42, 140), on a unit-cell grid of
  spacing ≈ d_min/3.
* :func:`sample_map`: map values at arbitrary points, trilinear or tricubic (Catmull–Rom cubic
  convolution; Keys 1981, IEEE Trans. ASSP 29, 1153) with periodic wrap.
* :func:`calc_density`: a resolution-blurred model density at points, a sum of isotropic
  Gaussians (one per atom), used as the "calculated" map of real-space correlations.
* :func:`residue_fit`: per-residue real-space correlation coefficient RSCC (Jones et al. 1991,
  Acta Cryst. A47, 110; Brändén & Jones 1990, Nature 343, 687) between 2mFo−DFc and the
  calculated density over grid points within a radius of the residue's atoms, the mean
  σ-scaled 2mFo−DFc at the atoms, the extreme mFo−DFc at the atoms (σ), and Z-scores of RSCC
  (Tickle 2012, Acta Cryst. D68, 454, for density Z-scores as a residue-level diagnostic).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

EIGHT_PI2 = 8.0 * np.pi**2


class ModelMaps(NamedTuple):
    """σA-weighted maps of a model on one unit-cell grid.

    Attributes:
        two_fofc: (na, nb, nc) 2mFo−DFc map (e/Å³ up to the data's scale), index [i, j, k] at the
            fractional point (i/na, j/nb, k/nc).
        fofc: (na, nb, nc) mFo−DFc map on the same grid (None where it was not asked for).
        crystal: :class:`jaxrefine.core.crystal.Crystal` of the grid.
        d_min: resolution of the coefficients (Å).
        r_work, r_free: R-factors of the model that phased the maps.
        fmodel: the :class:`jaxrefine.problem.fmodel.FmodelResult` behind the maps.
        hkl: (m, 3) int reflections of the coefficients (complete to d_min).
        two_coef, diff_coef: (m,) complex 2mFo−DFc and mFo−DFc coefficients.
    """

    two_fofc: np.ndarray
    fofc: np.ndarray
    crystal: object
    d_min: float
    r_work: float
    r_free: float
    fmodel: object
    hkl: np.ndarray = None
    two_coef: np.ndarray = None
    diff_coef: np.ndarray = None

    @property
    def sigma_two(self) -> float:
        """RMS of the 2mFo−DFc map over the cell (its mean is ~0: F000 is absent)."""
        return float(self.two_fofc.std())

    @property
    def sigma_diff(self) -> float:
        """RMS of the mFo−DFc map over the cell."""
        return float(self.fofc.std())


def model_maps(model, refl, sample_rate: float = 3.0, f_calc=None, f_mask=None, grid_shape=None,
               fill_missing: bool = False) -> ModelMaps:
    """2mFo−DFc and mFo−DFc maps of a model as given (F_model, bulk solvent, scales and σA fitted).

    Args:
        model: :class:`jaxrefine.io.model.Model`.
        refl: :class:`jaxrefine.io.reflections.Reflections`.
        sample_rate: grid spacing ≈ d_min / sample_rate.
        f_calc, f_mask: (n_refl,) complex precomputed F_calc / F_mask at ``refl.hkl`` (e.g. an omit
            map keeps the solvent mask of the full model).
        grid_shape: (na, nb, nc) to force a grid (e.g. to add maps point by point).
        fill_missing: fill unmeasured reflections with D·F_model in 2mFo−DFc.  Off by default:
            validation wants the least model bias, and a fill-in is pure model (it also costs a
            second F_calc).

    Returns:
        :class:`ModelMaps`.
    """
    from ..problem.fmodel import compute_fmodel, fmodel_maps

    res = compute_fmodel(model, refl, f_calc=f_calc, f_mask=f_mask)
    hkl, two, diff = fmodel_maps(model, refl, res, fill_missing=fill_missing)
    return _maps_of_coefficients(refl, hkl, two, diff, res.f_model, res, sample_rate, grid_shape)


def maps_of_f_model(refl, f_model, sigma_a, sample_rate: float = 3.0, difference: bool = True) -> ModelMaps:
    """2mFo−DFc and mFo−DFc maps from an F_model and σA at hand (a refinement's X-ray state: its scales
    and σA, the current F_calc), without refitting scales and σA as :func:`model_maps` does.

    Args:
        refl: the reflections; f_model: (n,) complex F_model at ``refl.hkl``; sigma_a: their
            :class:`jaxrefine.xray.targets.SigmaA`.
        difference: also the mFo−DFc map (False: ``fofc`` is None, for a caller that reads the 2mFo−DFc map
            alone, such as the water check after each macrocycle: one grid transform instead of two).

    Returns:
        :class:`ModelMaps` (``fmodel`` None).
    """
    from ..xray.maps import map_coefficients

    f_model = np.asarray(f_model)
    two, diff = map_coefficients(refl.f_obs, f_model, sigma_a, refl.centric, refl.epsilon)
    return _maps_of_coefficients(refl, refl.hkl, two, diff, f_model, None, sample_rate, difference=difference)


def _maps_of_coefficients(refl, hkl, two, diff, f_model, fmodel, sample_rate: float, grid_shape=None,
                          difference: bool = True) -> ModelMaps:
    from ..io.maps_io import map_from_coefficients
    from ..xray.stats import r_factors

    r = r_factors(refl.f_obs, f_model, refl.free, refl.d, n_bins=1)
    two_map = map_from_coefficients(refl.crystal, hkl, two, grid_shape=grid_shape, sample_rate=sample_rate)
    diff_map = map_from_coefficients(refl.crystal, hkl, diff, grid_shape=two_map.shape) if difference else None
    return ModelMaps(two_map, diff_map, refl.crystal, float(refl.d_min), float(r["r_work"]), float(r["r_free"]), fmodel,
                     hkl, np.asarray(two), np.asarray(diff))


# ---------------------------------------------------------------------------------- sampling


def _catmull_rom(t):
    """(..., 4) weights of the cubic convolution kernel (a = −½; Keys 1981) for offsets t in [0, 1)."""
    t2, t3 = t * t, t * t * t
    return np.stack(
        [-0.5 * t3 + t2 - 0.5 * t, 1.5 * t3 - 2.5 * t2 + 1.0, -1.5 * t3 + 2.0 * t2 + 0.5 * t, 0.5 * t3 - 0.5 * t2],
        axis=-1,
    )


def sample_map(values, xyz_frac, order: int = 3) -> np.ndarray:
    """Map values at fractional points, interpolated on the periodic grid.

    Args:
        values: (na, nb, nc) unit-cell map; [i, j, k] at (i/na, j/nb, k/nc).
        xyz_frac: (n, 3) fractional coordinates (any cell; wrapped).
        order: 1 trilinear, 3 tricubic (Catmull–Rom; exact at grid points, C¹).

    Returns:
        (n,) values.
    """
    values = np.asarray(values)
    shape = np.asarray(values.shape)
    p = np.asarray(xyz_frac, float).reshape(-1, 3) * shape[None]
    base = np.floor(p).astype(np.int64)
    t = p - base
    if order == 1:
        w = np.stack([1.0 - t, t], axis=-1)  # (n, 3, 2)
        offs = np.arange(2)
    elif order == 3:
        w = _catmull_rom(t)  # (n, 3, 4)
        offs = np.arange(-1, 3)
    else:
        raise ValueError(f"order must be 1 or 3, got {order}")
    ia = (base[:, 0, None] + offs[None]) % shape[0]
    ib = (base[:, 1, None] + offs[None]) % shape[1]
    ic = (base[:, 2, None] + offs[None]) % shape[2]
    v = values[ia[:, :, None, None], ib[:, None, :, None], ic[:, None, None, :]]  # (n, k, k, k)
    return np.einsum("nabc,na,nb,nc->n", v, w[:, 0], w[:, 1], w[:, 2])


def grid_points_near(xyz_cart, crystal, grid_shape, radius: float, chunk: int = 512):
    """Grid points within ``radius`` of any of the given atoms (periodic images not merged).

    Args:
        xyz_cart: (n, 3) atom positions (Å).
        crystal: cell of the grid.
        grid_shape: (na, nb, nc).
        radius: Å.

    Returns:
        (m, 3) int unwrapped grid indices (index mod shape addresses the map) and (m, 3) their
        Cartesian positions (Å), each point once, near the given atoms (not a symmetry image).
    """
    xyz_cart = np.asarray(xyz_cart, float).reshape(-1, 3)
    shape = np.asarray(grid_shape, np.int64)
    frac = np.asarray(crystal.frac, float)
    orth = np.asarray(crystal.orth, float)
    # half-extent of a sphere along fractional axis a is radius · |row a of frac|
    half = np.ceil(radius * np.linalg.norm(frac, axis=1) * shape).astype(np.int64) + 1
    rng = [np.arange(-h, h + 1) for h in half]
    offs = np.stack(np.meshgrid(*rng, indexing="ij"), -1).reshape(-1, 3)
    found = []
    for s in range(0, len(xyz_cart), chunk):
        x = xyz_cart[s:s + chunk]
        centre = np.rint(x @ frac.T * shape[None]).astype(np.int64)
        idx = (centre[:, None, :] + offs[None]).reshape(-1, 3)
        pos = (idx / shape[None]) @ orth.T
        d2 = np.sum((pos.reshape(len(x), -1, 3) - x[:, None]) ** 2, axis=-1).reshape(-1)
        found.append(idx[d2 <= radius**2])
    if not found:
        return np.zeros((0, 3), np.int64), np.zeros((0, 3))
    idx = np.unique(np.concatenate(found), axis=0)
    return idx, (idx / shape[None]) @ orth.T


def map_values_at(values, idx) -> np.ndarray:
    """(m,) values of a unit-cell map at unwrapped integer grid indices (m, 3)."""
    shape = np.asarray(values.shape)
    w = np.asarray(idx) % shape[None]
    return np.asarray(values)[w[:, 0], w[:, 1], w[:, 2]]


def resolution_blur(d_min: float) -> float:
    """B (Å²) added to each atom's B so that a Gaussian atom looks like a map at d_min.

    A Gaussian exp(−B s²/4) falls to 1/e at s = 1/d_min for B = 4 d_min²; the atomic form factor
    itself adds ~10 Å² for light atoms (fit of the IT92 carbon curve to one Gaussian; International
    Tables Vol. C, Table 6.1.1.4).
    """
    return 10.0 + 4.0 * d_min**2


def calc_density(points_cart, xyz_cart, weight, b_iso, d_min: float, cutoff: float | None = None) -> np.ndarray:
    """Model density at points: Σ_a w_a (4π/B'_a)^{3/2} exp(−4π² r² / B'_a), B'_a = B_a + blur.

    The real-space form of exp(−B' s²/4) (e.g. Agarwal 1978, Acta Cryst. A34, 791), with the blur
    of :func:`resolution_blur`; atoms farther than ``cutoff`` from a point are ignored.

    Args:
        points_cart: (m, 3) Å.
        xyz_cart: (n, 3) atoms (Å), already placed near the points (no symmetry applied here).
        weight: (n,) electrons × occupancy.
        b_iso: (n,) Å².
        d_min: map resolution (Å).
        cutoff: Å (default: 2.5 Gaussian σ of the widest atom, at least 2.5 Å).

    Returns:
        (m,) density (e/Å³).
    """
    points_cart = np.asarray(points_cart, float).reshape(-1, 3)
    out = np.zeros(len(points_cart))
    if len(xyz_cart) == 0 or len(points_cart) == 0:
        return out
    b = np.asarray(b_iso, float) + resolution_blur(d_min)
    if cutoff is None:
        cutoff = max(2.5, 2.5 * float(np.sqrt(b.max() / EIGHT_PI2)))
    tree_p = cKDTree(points_cart)
    tree_a = cKDTree(np.asarray(xyz_cart, float))
    pairs = tree_p.sparse_distance_matrix(tree_a, cutoff, output_type="ndarray")
    if len(pairs) == 0:
        return out
    i, j, r = pairs["i"], pairs["j"], pairs["v"]
    val = np.asarray(weight, float)[j] * (4.0 * np.pi / b[j]) ** 1.5 * np.exp(-4.0 * np.pi**2 * r**2 / b[j])
    np.add.at(out, i, val)
    return out


def calc_density_with_mates(points_cart, xyz_cart, weight, b_iso, crystal, d_min: float) -> np.ndarray:
    """:func:`calc_density` of the atoms and of their symmetry copies near the points."""
    weight, b_iso = np.asarray(weight, float), np.asarray(b_iso, float)
    cut = max(2.5, 2.5 * float(np.sqrt((b_iso.max() + resolution_blur(d_min)) / EIGHT_PI2))) if len(b_iso) else 2.5
    img, img_xyz = symmetry_images_near(xyz_cart, crystal, points_cart, cut)
    xyz_all = np.concatenate([np.asarray(xyz_cart, float).reshape(-1, 3), img_xyz])
    return calc_density(points_cart, xyz_all, np.concatenate([weight, weight[img]]),
                        np.concatenate([b_iso, b_iso[img]]), d_min, cutoff=cut)


def _corr_from_sums(n, sx, sy, sxx, syy, sxy):
    """Pearson correlation from accumulated sums (arrays broadcast); nan where undefined."""
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy - sx * sy / n
        vx = sxx - sx * sx / n
        vy = syy - sy * sy / n
        return cov / np.sqrt(vx * vy)


def fit_radius(d_min: float) -> float:
    """Radius (Å) around atoms that defines a residue's region for RSCC: 1.0 + 0.3·d_min."""
    return 1.0 + 0.3 * float(d_min)


def residue_table(model):
    """Residues of a model in file order: (res_index (n_res,), chain, seq, icode, name, kind) arrays."""
    first = np.unique(model.res_index, return_index=True)[1]
    return (model.res_index[first], model.chain_id[first], model.res_seq[first], model.icode[first],
            model.res_name[first], model.kind[first])


def residue_fit(model, maps: ModelMaps, radius: float | None = None, include_hydrogens: bool = False) -> list:
    """Per-residue fit to the 2mFo−DFc map: RSCC, density at atoms, difference extremes, Z-scores.

    RSCC = corr(ρ_obs, ρ_calc) over the grid points within ``radius`` of the residue's atoms, with
    ρ_calc from *all* atoms of the model (:func:`calc_density`), so that neighbours' density is
    accounted for as in an Fc map (Jones et al. 1991). Z-scores are (RSCC − mean)/SD over the
    residues of the same kind (protein, nucleic, ligand, water).

    Args:
        model: :class:`jaxrefine.io.model.Model` (the one that phased ``maps``).
        maps: :class:`ModelMaps`.
        radius: Å (default :func:`fit_radius`).
        include_hydrogens: use hydrogens in the region and the calculated density.

    Returns:
        list of dicts (file order): chain, seq, icode, name, kind, n_atoms, rscc, density_sigma
        (mean 2mFo−DFc / σ at the atoms), diff_min_sigma, diff_max_sigma (mFo−DFc / σ), b_mean,
        rscc_z.
    """
    keep = np.ones(model.n_atoms, bool) if include_hydrogens else ~model.is_hydrogen
    xyz = model.xyz_cart[keep]
    res_of_atom = model.res_index[keep]
    radius = fit_radius(maps.d_min) if radius is None else float(radius)
    crystal = maps.crystal
    idx, pts = grid_points_near(xyz, crystal, maps.two_fofc.shape, radius)
    rho_o = map_values_at(maps.two_fofc, idx)
    weight = model.atomic_number[keep] * model.occ[keep]
    rho_c = calc_density_with_mates(pts, xyz, weight, model.b_iso[keep], crystal, maps.d_min)
    # (point, residue) pairs: points within radius of any atom of the residue
    pairs = cKDTree(pts).query_ball_point(xyz, radius)
    p_idx = np.concatenate([np.asarray(p, np.int64) for p in pairs]) if len(pairs) else np.zeros(0, np.int64)
    r_idx = np.repeat(res_of_atom, [len(p) for p in pairs])
    n_res = model.n_residues
    pr = np.unique(np.stack([p_idx, r_idx], 1), axis=0)
    p_idx, r_idx = pr[:, 0], pr[:, 1]
    x, y = rho_o[p_idx], rho_c[p_idx]
    sums = [np.bincount(r_idx, w, minlength=n_res) for w in (np.ones_like(x), x, y, x * x, y * y, x * y)]
    rscc = _corr_from_sums(*sums)
    frac = crystal.to_frac(xyz)
    at_two = sample_map(maps.two_fofc, frac) / maps.sigma_two
    at_diff = sample_map(maps.fofc, frac) / maps.sigma_diff
    n_at = np.bincount(res_of_atom, minlength=n_res)
    dens = np.bincount(res_of_atom, at_two, minlength=n_res) / np.maximum(n_at, 1)
    dmin = np.full(n_res, np.inf)
    dmax = np.full(n_res, -np.inf)
    np.minimum.at(dmin, res_of_atom, at_diff)
    np.maximum.at(dmax, res_of_atom, at_diff)
    b_mean = np.bincount(res_of_atom, model.b_iso[keep], minlength=n_res) / np.maximum(n_at, 1)
    ri, chain, seq, icode, name, kind = residue_table(model)
    z = np.full(n_res, np.nan)
    for k in np.unique(kind):
        sel = (kind == k) & np.isfinite(rscc[ri])
        if sel.sum() >= 3:
            v = rscc[ri[sel]]
            z[ri[sel]] = (v - v.mean()) / max(v.std(), 1e-6)
    out = []
    for r, c, s, ic, nm, kd in zip(ri, chain, seq, icode, name, kind):
        if n_at[r] == 0:
            continue
        out.append({
            "chain": str(c), "seq": int(s), "icode": str(ic), "name": str(nm), "kind": str(kd),
            "n_atoms": int(n_at[r]), "rscc": _f(rscc[r]), "density_sigma": _f(dens[r]),
            "diff_min_sigma": _f(dmin[r]), "diff_max_sigma": _f(dmax[r]), "b_mean": _f(b_mean[r]), "rscc_z": _f(z[r]),
        })
    return out


def _f(v) -> float | None:
    """Float rounded to 4 decimals, None for nan/inf (JSON-safe)."""
    v = float(v)
    return round(v, 4) if np.isfinite(v) else None


def worst_residues(rows: list, n: int = 10, kinds=("protein", "nucleic", "ligand")) -> list:
    """The n rows of lowest RSCC among residues of the given kinds."""
    cand = [r for r in rows if r["kind"] in kinds and r["rscc"] is not None]
    return sorted(cand, key=lambda r: r["rscc"])[:n]


def region_correlation(map_values, model_xyz, weight, b_iso, crystal, d_min: float, radius: float | None = None):
    """Correlation between a unit-cell map and the calculated density of some atoms, over the grid
    points within ``radius`` of those atoms (the omit-map check: density of omitted atoms).

    Args:
        map_values: (na, nb, nc).
        model_xyz: (n, 3) Å; weight: (n,) electrons × occupancy; b_iso: (n,) Å².
        crystal: cell of the map.
        d_min: Å.
        radius: Å (default :func:`fit_radius`).

    Returns:
        (correlation, mean map value at the points).
    """
    radius = fit_radius(d_min) if radius is None else float(radius)
    idx, pts = grid_points_near(model_xyz, crystal, map_values.shape, radius)
    x = map_values_at(map_values, idx)
    y = calc_density_with_mates(pts, model_xyz, weight, b_iso, crystal, d_min)
    return float(np.corrcoef(x, y)[0, 1]), float(x.mean())


def symmetry_images_near(xyz_cart, crystal, points_cart, cutoff: float):
    """Symmetry copies of atoms (all operators × lattice shifts −1..1, identity excluded) that lie
    within ``cutoff`` of any of the points: the crystal neighbours a local density must include.

    Args:
        xyz_cart: (n, 3) atoms of the asymmetric unit (Å).
        crystal: cell and operators.
        points_cart: (m, 3) Å.
        cutoff: Å.

    Returns:
        (k,) int index of the original atom and (k, 3) Cartesian position of each copy.
    """
    xyz_cart = np.asarray(xyz_cart, float).reshape(-1, 3)
    points_cart = np.asarray(points_cart, float).reshape(-1, 3)
    if len(xyz_cart) == 0 or len(points_cart) == 0:
        return np.zeros(0, np.int64), np.zeros((0, 3))
    tree = cKDTree(points_cart)
    frac = crystal.to_frac(xyz_cart)
    lattice = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    centre = crystal.to_frac(points_cart).mean(0)
    idx_out, xyz_out = [], []
    for rot, trans in zip(np.asarray(crystal.rot, float), np.asarray(crystal.trans, float)):
        f = frac @ rot.T + trans
        is_identity = np.allclose(rot, np.eye(3)) and np.allclose(trans % 1.0, 0.0)
        if not is_identity:
            f = f - np.floor(f.mean(0) - centre + 0.5)  # bring the copy near the points' cell
        for shift in lattice:
            if is_identity and not shift.any():
                continue
            x = crystal.to_cart(f + shift)
            d, _ = tree.query(x, distance_upper_bound=cutoff)
            near = np.isfinite(d)
            if near.any():
                idx_out.append(np.nonzero(near)[0])
                xyz_out.append(x[near])
    if not idx_out:
        return np.zeros(0, np.int64), np.zeros((0, 3))
    return np.concatenate(idx_out), np.concatenate(xyz_out)


CSV_COLUMNS = ("chain", "seq", "icode", "name", "kind", "n_atoms", "rscc", "rscc_z", "density_sigma",
               "diff_min_sigma", "diff_max_sigma", "b_mean")


def residue_csv(rows: list) -> str:
    """The per-residue table as CSV text (one header line, then one line per residue)."""
    lines = [",".join(CSV_COLUMNS)]
    for r in rows:
        lines.append(",".join("" if r.get(k) is None else str(r[k]) for k in CSV_COLUMNS))
    return "\n".join(lines) + "\n"


def plot_residue_fit(rows: list, path, flags=(), title: str = "Real-space correlation per residue") -> None:
    """PNG of RSCC along each chain (polymer residues), flagged register-shift segments shaded."""
    from ..io.figures import new_figure, save_png

    chains = sorted({r["chain"] for r in rows if r["kind"] in ("protein", "nucleic")})
    fig = new_figure(figsize=(8, 2.2 * max(len(chains), 1)))
    axes = fig.subplots(max(len(chains), 1), 1, squeeze=False)
    for ax, ch in zip(axes[:, 0], chains):
        sel = [r for r in rows if r["chain"] == ch and r["kind"] in ("protein", "nucleic") and r["rscc"] is not None]
        ax.plot([r["seq"] for r in sel], [r["rscc"] for r in sel], "-", lw=0.8, color="k")
        for f in flags:
            if f["chain"] == ch:
                ax.axvspan(f["start"], f["end"], color="tab:red", alpha=0.25)
        ax.set_ylabel(f"RSCC chain {ch}")
        ax.set_ylim(min(0.0, min([r["rscc"] for r in sel], default=0.0)), 1.0)
    axes[-1, 0].set_xlabel("residue number")
    axes[0, 0].set_title(title)
    save_png(fig, path)
