"""A self-contained SYNTHETIC demonstration crystal: build, simulate data, perturb, refine.

The peptide is a helix–loop–helix built from ideal internal coordinates (natural extension
reference frame, Parsons et al. 2005, J. Comput. Chem. 26, 1063) with bond lengths and angles
from Engh & Huber (2001), International Tables Vol. F, ch. 18.3, and ideal α-helix backbone
torsions (φ, ψ) = (−57°, −47°) (Pauling, Corey & Branson 1951).  It is placed in a P 2₁2₁2₁ cell,
its "observed" amplitudes are simulated with jaxrefine's own structure factors, flat bulk solvent
and Gaussian noise, 5% of reflections are flagged free, and the model is then perturbed
(coordinate shake, B reset, one side chain rotated out of place) and refined with the normal engine.
Everything it writes is labelled SYNTHETIC.
"""
from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger("jaxrefine")

# Backbone (Engh & Huber 2001, Table 18.3.2.2): bond lengths Å, angles degrees
N_CA, CA_C, C_N, C_O, CA_CB = 1.458, 1.525, 1.329, 1.231, 1.530
ANG_N_CA_C, ANG_CA_C_N, ANG_C_N_CA, ANG_CA_C_O, ANG_N_CA_CB = 111.0, 116.2, 121.7, 120.1, 110.5
TORSION_C_N_CA_CB = -122.6  # L-amino acids (improper torsion fixing CA chirality)

# side chains: (atom, element, (ref1, ref2, ref3), bond Å, angle °, torsion °); refs are atom names
# built after N, CA, C, CB.  Values after Engh & Huber (2001); torsions are common rotamers
# (Lovell et al. 2000, Proteins 40, 389).
SIDE_CHAINS = {
    "GLY": [],
    "ALA": [],
    "SER": [("OG", "O", ("N", "CA", "CB"), 1.417, 111.2, -60.0)],
    "LEU": [
        ("CG", "C", ("N", "CA", "CB"), 1.530, 116.3, -60.0),
        ("CD1", "C", ("CA", "CB", "CG"), 1.521, 110.7, 180.0),
        ("CD2", "C", ("CA", "CB", "CG"), 1.521, 110.7, -60.0),
    ],
    "GLU": [
        ("CG", "C", ("N", "CA", "CB"), 1.520, 114.1, -60.0),
        ("CD", "C", ("CA", "CB", "CG"), 1.516, 112.6, 180.0),
        ("OE1", "O", ("CB", "CG", "CD"), 1.249, 118.4, 0.0),
        ("OE2", "O", ("CB", "CG", "CD"), 1.249, 118.4, 180.0),
    ],
    "LYS": [
        ("CG", "C", ("N", "CA", "CB"), 1.520, 114.1, -60.0),
        ("CD", "C", ("CA", "CB", "CG"), 1.520, 111.3, 180.0),
        ("CE", "C", ("CB", "CG", "CD"), 1.520, 111.3, 180.0),
        ("NZ", "N", ("CG", "CD", "CE"), 1.489, 111.9, 180.0),
    ],
    "PHE": [
        ("CG", "C", ("N", "CA", "CB"), 1.502, 113.8, 180.0),
        ("CD1", "C", ("CA", "CB", "CG"), 1.384, 120.7, 80.0),
        ("CD2", "C", ("CA", "CB", "CG"), 1.384, 120.7, -100.0),
        ("CE1", "C", ("CB", "CG", "CD1"), 1.382, 120.7, 180.0),
        ("CE2", "C", ("CB", "CG", "CD2"), 1.382, 120.7, 180.0),
        ("CZ", "C", ("CG", "CD1", "CE1"), 1.382, 120.0, 0.0),
    ],
}

# helix (12) – loop (4) – helix (12); the loop's (φ, ψ) turn the second helix back
SEQUENCE = "SEELLKKALELAKGSGSPEELAKKFLELLK".replace("P", "E")
HELIX = (-57.0, -47.0)
LOOP = {14: (80.0, 10.0), 15: (-80.0, 150.0), 16: (-70.0, 140.0)}
THREE = {"S": "SER", "E": "GLU", "L": "LEU", "K": "LYS", "A": "ALA", "G": "GLY", "F": "PHE"}
MOVED_SIDE_CHAIN = 25  # residue number of the PHE whose side chain is put out of place

DEMO_D_MIN = 1.8  # Å
K_SOL, B_SOL, B_OVERALL = 0.35, 46.0, 0.0
NOISE_REL, NOISE_ABS = 0.03, 0.02  # σ = NOISE_REL·|F| + NOISE_ABS·mean|F|
SHAKE_RMS = 0.35  # Å
FREE_FRACTION = 0.05
MARGIN = 6.0  # Å between the molecule and its symmetry mates (at least)


def place(a, b, c, bond, angle_deg, torsion_deg):
    """Position of atom d with |cd| = bond, angle bcd and torsion abcd (NeRF; Parsons et al. 2005)."""
    ang, tor = np.radians(angle_deg), np.radians(torsion_deg)
    bc = c - b
    bc /= np.linalg.norm(bc)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d2 = np.array([-bond * np.cos(ang), bond * np.sin(ang) * np.cos(tor), bond * np.sin(ang) * np.sin(tor)])
    return c + d2[0] * bc + d2[1] * m + d2[2] * n


def build_peptide(sequence: str = SEQUENCE):
    """Atom records (dicts) of the peptide, chain A, residues numbered from 1."""
    n_res = len(sequence)
    phipsi = [LOOP.get(i + 1, HELIX) for i in range(n_res)]
    n = np.array([0.0, 0.0, 0.0])
    ca = np.array([N_CA, 0.0, 0.0])
    c = ca + CA_C * np.array([-np.cos(np.radians(ANG_N_CA_C)), np.sin(np.radians(ANG_N_CA_C)), 0.0])
    backbone = [(n, ca, c)]
    for i in range(1, n_res):
        pn, pca, pc = backbone[-1]
        nn = place(pn, pca, pc, C_N, ANG_CA_C_N, phipsi[i - 1][1])
        nca = place(pca, pc, nn, N_CA, ANG_C_N_CA, 180.0)
        nc = place(pc, nn, nca, CA_C, ANG_N_CA_C, phipsi[i][0])
        backbone.append((nn, nca, nc))
    atoms = []
    for i, (rn, rca, rc) in enumerate(backbone):
        name = THREE[sequence[i]]
        if i + 1 < n_res:
            o = place(backbone[i + 1][0], rca, rc, C_O, ANG_CA_C_O, 180.0)
        else:  # C-terminal O: trans to N about CA–C, with ψ of the helix
            o = place(rn, rca, rc, C_O, ANG_CA_C_O, phipsi[i][1] + 180.0)
        pos = {"N": rn, "CA": rca, "C": rc, "O": o}
        if name != "GLY":
            pos["CB"] = place(rc, rn, rca, CA_CB, ANG_N_CA_CB, TORSION_C_N_CA_CB)
        elements = {"N": "N", "CA": "C", "C": "C", "O": "O", "CB": "C"}
        for atom, el, refs, bond, ang, tor in SIDE_CHAINS[name]:
            pos[atom] = place(pos[refs[0]], pos[refs[1]], pos[refs[2]], bond, ang, tor)
            elements[atom] = el
        for atom, xyz in pos.items():
            atoms.append({"chain": "A", "res_name": name, "res_seq": i + 1, "atom_name": atom,
                          "element": elements[atom], "xyz": xyz, "b": 15.0 + 10.0 * abs(i - n_res / 2) / n_res, "occ": 1.0})
    return atoms


def _orthorhombic_cell(xyz):
    """A P 2₁2₁2₁ cell around the molecule with at least MARGIN Å to every symmetry mate."""
    ext = xyz.max(0) - xyz.min(0)
    return np.concatenate([ext + 2 * MARGIN, [90.0, 90.0, 90.0]])


def _min_symmetry_distance(xyz_frac, crystal):
    from scipy.spatial import cKDTree  # scipy comes with jax

    own = cKDTree(crystal.to_cart(xyz_frac))
    best = np.inf
    for k in range(crystal.n_ops):
        mate = xyz_frac @ crystal.rot[k].T + crystal.trans[k]
        for shift in np.array(np.meshgrid([-1, 0, 1], [-1, 0, 1], [-1, 0, 1])).reshape(3, -1).T:
            if k == 0 and not shift.any():
                continue
            d, _ = own.query(crystal.to_cart(mate + shift))
            best = min(best, float(d.min()))
    return best


def make_demo_crystal(seed: int = 0, sequence: str = SEQUENCE, d_min: float = DEMO_D_MIN):
    """(true Model, Reflections) of the synthetic crystal: ideal peptide, simulated data to ``d_min`` Å
    (a shorter ``sequence`` gives a smaller crystal, e.g. for calibration tests)."""
    from ..core.crystal import d_spacing
    from ..io.build import model_from_atoms, unique_hkl
    from ..io.reflections import Reflections, generate_free_flags
    from ..core.crystal import centric_flags, epsilon_factors
    from ..io.formfactor_io import it92_form_factors
    from ..problem.fmodel import model_f_mask
    from ..xray.structure_factors import make_sf_setup, structure_factors_jit

    atoms = build_peptide(sequence)
    xyz = np.array([a["xyz"] for a in atoms])
    xyz -= xyz.mean(0)
    cell = _orthorhombic_cell(xyz)
    # centre the molecule at (1/4, 1/4, 1/4): away from the 2₁ axes
    for a, p in zip(atoms, xyz + cell[:3] / 4):
        a["xyz"] = p
    model = model_from_atoms(atoms, cell, "P 21 21 21", source="SYNTHETIC demo peptide")
    for _ in range(20):  # grow the cell until symmetry mates keep their distance
        if _min_symmetry_distance(model.xyz_frac, model.crystal) >= MARGIN - 1e-6:
            break
        cell[:3] *= 1.08
        for a, p in zip(atoms, xyz + cell[:3] / 4):
            a["xyz"] = p
        model = model_from_atoms(atoms, cell, "P 21 21 21", source="SYNTHETIC demo peptide")
    model = regularise(model)
    crystal = model.crystal
    hkl = unique_hkl(crystal, d_min)
    d = d_spacing(hkl, crystal)
    s2 = 1.0 / d**2
    ff = it92_form_factors(model.element)
    setup = make_sf_setup(crystal, hkl, ff, d_min=d_min)
    f_calc = np.asarray(structure_factors_jit(model.xyz_frac, model.b_iso, model.occ, setup))
    f_mask, _, _ = model_f_mask(model, crystal, hkl, d_min)
    f_true = np.abs((f_calc + K_SOL * np.exp(-B_SOL * s2 / 4) * f_mask) * np.exp(-B_OVERALL * s2 / 4))
    rng = np.random.default_rng(seed)
    sig = NOISE_REL * f_true + NOISE_ABS * f_true.mean()
    f_obs = np.abs(f_true + rng.normal(0.0, 1.0, f_true.shape) * sig)
    refl = Reflections(
        hkl=hkl, f_obs=f_obs, sig_f_obs=sig, free=generate_free_flags(hkl, FREE_FRACTION, seed), d=d,
        centric=centric_flags(hkl, crystal), epsilon=epsilon_factors(hkl, crystal), crystal=crystal,
        source="SYNTHETIC demo data", columns={"F": "FP", "SIGF": "SIGFP", "FREE": "FREE"},
        free_convention=f"generated ({100 * FREE_FRACTION:.0f}%, seed {seed})",
    )
    return model, refl


def regularise(model, n_steps: int = 150):
    """Minimise E_geometry alone (built-in or library restraints) so the peptide is ideal."""
    import jax
    import jax.numpy as jnp

    from ..io.build import with_coordinates
    from ..io.topology import build_restraints, find_monlib
    from ..problem.neighbours import build_nonbonded
    from ..refine.optimize import minimise
    from ..restraints import GeometryWeights

    restraints = build_restraints(model, monlib=find_monlib(None))
    nonbonded = build_nonbonded(model, restraints, model.crystal)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    w = GeometryWeights(*[jnp.asarray(1.0, dtype) for _ in GeometryWeights._fields])
    x, _ = minimise(_geometry_only, jnp.asarray(model.xyz_cart, dtype),
                    (restraints, nonbonded, w, jnp.asarray(model.crystal.orth, dtype), jnp.asarray(model.crystal.frac, dtype)),
                    n_steps=n_steps)
    return with_coordinates(model, xyz_cart=np.asarray(x, float))


def _geometry_only(xyz, restraints, nonbonded, w, orth, frac):
    from ..restraints import geometry_energy

    return geometry_energy(xyz, restraints, nonbonded, w, orth, frac)


def perturb(model, seed: int = 0):
    """Shake coordinates (SHAKE_RMS Å), reset B to the mean, rotate one side chain out of place."""
    from ..io.build import with_coordinates

    rng = np.random.default_rng(seed + 1)
    xyz = model.xyz_cart.copy()
    # side chain of residue MOVED_SIDE_CHAIN: rotate about CA–CB by 120° (a wrong rotamer)
    sel = (model.res_seq == MOVED_SIDE_CHAIN) & ~np.isin(model.atom_name, ["N", "CA", "C", "O", "CB"])
    ca = xyz[(model.res_seq == MOVED_SIDE_CHAIN) & (model.atom_name == "CA")][0]
    cb = xyz[(model.res_seq == MOVED_SIDE_CHAIN) & (model.atom_name == "CB")][0]
    axis = (cb - ca) / np.linalg.norm(cb - ca)
    th = np.radians(120.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(th) * k + (1 - np.cos(th)) * k @ k
    xyz[sel] = (xyz[sel] - cb) @ rot.T + cb
    xyz += rng.normal(0.0, SHAKE_RMS / np.sqrt(3), xyz.shape)
    b = np.full(model.n_atoms, float(model.b_iso.mean()))
    return with_coordinates(model, xyz_cart=xyz, b_iso=b)


def run_demo(out_dir: str, n_cycles: int = 6, progress=print, plots: bool = True, seed: int = 0, cycle_progress=print) -> dict:
    """Build, perturb and refine the synthetic crystal; write everything into ``out_dir``.

    Args:
        progress: callable for the demo's own lines; cycle_progress: for the per-cycle table
            (None when logging already shows it, as in the CLI).

    Returns the metrics dict of the refinement, plus ``rmsd_start``/``rmsd_final`` (Å, to the true model).
    """
    from ..config import Config, load_config
    from ..io.writers import write_model, write_mtz
    from ..refine.run import run_refinement
    from ..validate.waters import water_hooks

    os.makedirs(out_dir, exist_ok=True)
    progress("SYNTHETIC demo: building an ideal helix–loop–helix peptide and simulating its data ...")
    true_model, refl = make_demo_crystal(seed)
    start = perturb(true_model, seed)
    c = true_model.crystal.cell
    progress(f"SYNTHETIC crystal: {true_model.n_atoms} atoms, P 21 21 21, cell {c[0]:.1f} {c[1]:.1f} {c[2]:.1f} Å, "
             f"{refl.n} reflections to {DEMO_D_MIN} Å ({refl.n_free} free)")
    write_model(true_model, os.path.join(out_dir, "synthetic_true.pdb"), remarks={"version": "SYNTHETIC"})
    write_model(start, os.path.join(out_dir, "synthetic_start.pdb"), remarks={"version": "SYNTHETIC"})
    write_mtz(os.path.join(out_dir, "synthetic_data.mtz"), refl.crystal, refl.hkl,
              {"FP": ("F", refl.f_obs), "SIGFP": ("Q", refl.sig_f_obs), "FREE": ("I", np.where(refl.free, 0, 1))},
              title="jaxrefine SYNTHETIC demo data")
    cfg: Config = load_config(None, [f"refine.n_cycles={n_cycles}", f"output.plots={'true' if plots else 'false'}"])
    metrics = run_refinement(os.path.join(out_dir, "synthetic_start.pdb"), os.path.join(out_dir, "synthetic_data.mtz"),
                             os.path.join(out_dir, "refined"), cfg, progress=cycle_progress,
                             plot_title="SYNTHETIC demo crystal: R per macrocycle", **water_hooks(cfg))
    from ..io.model import read_model

    final = read_model(os.path.join(out_dir, "refined", "refined.pdb"))
    metrics["rmsd_start"] = float(np.sqrt(((start.xyz_cart - true_model.xyz_cart) ** 2).sum(1).mean()))
    metrics["rmsd_final"] = float(np.sqrt(((final.xyz_cart - true_model.xyz_cart) ** 2).sum(1).mean()))
    progress(f"SYNTHETIC demo: coordinate error to the true model {metrics['rmsd_start']:.2f} Å -> {metrics['rmsd_final']:.2f} Å")
    return metrics
