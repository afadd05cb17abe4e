"""Built-in restraint dictionary for the 20 standard amino acids, the peptide link and water.

Used when no CCP4 monomer library is available, so that proteins refine with no external files.
The monomer library is always preferred when found (``--monlib``, ``$CLIBD_MON`` or the config).

Sources of the ideal values:

* bond lengths and bond angles (values and esds): R. A. Engh & R. Huber (2001), "Structure
  quality and target parameters", International Tables for Crystallography Vol. F, ch. 18.3,
  pp. 382–392 (Tables 18.3.2.1–18.3.2.4; the "general" main-chain class unless the residue is
  Gly, Pro, or a β-branched Ile/Thr/Val).  The C-terminal OXT uses the carboxylate values of Asp.
* chiral centres (Cα of all but Gly, Cβ of Ile and Thr) and planes: from the L-amino-acid
  stereochemistry (IUPAC-IUB 1970, Biochemistry 9, 3471); plane esd 0.02 Å.
* side-chain torsions: staggered χ (period 3) and the aromatic/amide χ with period 2, esds as
  commonly used by refinement programs (Lovell et al. 2000, Proteins 40, 389); ω = 180° ± 5°.
* energy types and van der Waals radii follow the CCP4 ener_lib names (Vagin et al. 2004,
  Acta Cryst. D60, 2184) so that :mod:`jaxrefine.io.topology` finds the same radii.

The dictionary is rendered as monomer-library mmCIF text (:func:`builtin_monlib_cif`) and read by
gemmi in :mod:`jaxrefine.io.topology`, so links, altlocs and missing atoms are handled exactly as
for the full library.  No gemmi import here.
"""
from __future__ import annotations

from functools import lru_cache

# (name, element, energy type) of the main chain; CB is added by each residue
_MAIN_ATOMS = [("N", "N", "NH1"), ("CA", "C", "CH1"), ("C", "C", "C"), ("O", "O", "O"), ("OXT", "O", "OC")]

# Engh & Huber 2001, Table 18.3.2.2 (main chain): value, esd per class
_MAIN = {
    "general": {"N-CA": (1.459, 0.020), "CA-C": (1.525, 0.026), "C-O": (1.229, 0.019), "CA-CB": (1.530, 0.020),
                "N-CA-C": (111.0, 2.7), "N-CA-CB": (110.6, 1.8), "CB-CA-C": (110.4, 2.0), "CA-C-O": (120.1, 2.1)},
    "ALA": {"CA-CB": (1.520, 0.021), "N-CA-CB": (110.1, 1.4), "CB-CA-C": (110.1, 1.5)},
    "beta": {"CA-CB": (1.540, 0.027), "N-CA-CB": (111.5, 1.7), "CB-CA-C": (109.1, 2.2)},  # Ile, Thr, Val
    "GLY": {"N-CA": (1.456, 0.015), "CA-C": (1.514, 0.016), "N-CA-C": (113.1, 2.5), "CA-C-O": (120.6, 1.8)},
    "PRO": {"N-CA": (1.468, 0.017), "CA-C": (1.524, 0.020), "CA-CB": (1.531, 0.020), "N-CA-C": (112.1, 2.6),
            "N-CA-CB": (103.3, 1.2), "CB-CA-C": (111.7, 2.1), "CA-C-O": (120.2, 2.4)},
}
_OXT = {"C-OXT": (1.249, 0.023), "CA-C-OXT": (118.4, 2.3), "O-C-OXT": (123.3, 1.9)}  # as Asp carboxylate

# Peptide link (Engh & Huber 2001, Table 18.3.2.2): general, and to a following proline
PEPTIDE = {"C-N": (1.336, 0.023), "CA-C-N": (117.2, 2.2), "O-C-N": (122.7, 1.6), "C-N-CA": (121.7, 1.8)}
PEPTIDE_PRO = {"C-N": (1.341, 0.016), "CA-C-N": (117.1, 2.8), "O-C-N": (121.1, 1.9), "C-N-CA": (119.3, 1.5), "C-N-CD": (128.4, 2.1)}

# Side chains (Engh & Huber 2001, Tables 18.3.2.3-4): atoms (name, element, energy type),
# bonds "A-B": (Å, esd), angles "A-B-C": (deg, esd), planes, extra chiral centres, torsions.
_SIDE = {
    "ALA": {"atoms": [], "bonds": {}, "angles": {}},
    "GLY": {"atoms": [], "bonds": {}, "angles": {}},
    "SER": {"atoms": [("OG", "O", "OH1")], "bonds": {"CB-OG": (1.417, 0.020)}, "angles": {"CA-CB-OG": (111.2, 1.8)},
            "chi": [("N", "CA", "CB", "OG", 3)]},
    "CYS": {"atoms": [("SG", "S", "SH1")], "bonds": {"CB-SG": (1.812, 0.016)}, "angles": {"CA-CB-SG": (114.0, 1.8)},
            "chi": [("N", "CA", "CB", "SG", 3)]},
    "THR": {"atoms": [("OG1", "O", "OH1"), ("CG2", "C", "CH3")], "cb": "CH1",
            "bonds": {"CB-OG1": (1.428, 0.020), "CB-CG2": (1.519, 0.033)},
            "angles": {"CA-CB-OG1": (109.2, 2.1), "CA-CB-CG2": (111.1, 2.2), "OG1-CB-CG2": (109.3, 2.2)},
            "chir": [("CB", "CA", "OG1", "CG2", "positive")], "chi": [("N", "CA", "CB", "OG1", 3)]},
    "VAL": {"atoms": [("CG1", "C", "CH3"), ("CG2", "C", "CH3")], "cb": "CH1",
            "bonds": {"CB-CG1": (1.524, 0.021), "CB-CG2": (1.524, 0.021)},
            "angles": {"CA-CB-CG1": (110.9, 1.5), "CA-CB-CG2": (110.9, 1.5), "CG1-CB-CG2": (110.9, 1.6)},
            "chi": [("N", "CA", "CB", "CG1", 3)]},
    "ILE": {"atoms": [("CG1", "C", "CH2"), ("CG2", "C", "CH3"), ("CD1", "C", "CH3")], "cb": "CH1",
            "bonds": {"CB-CG1": (1.536, 0.028), "CB-CG2": (1.524, 0.031), "CG1-CD1": (1.500, 0.069)},
            "angles": {"CA-CB-CG1": (110.4, 1.7), "CA-CB-CG2": (110.5, 1.7), "CG1-CB-CG2": (111.4, 2.2), "CB-CG1-CD1": (113.8, 2.1)},
            "chir": [("CB", "CA", "CG1", "CG2", "positive")], "chi": [("N", "CA", "CB", "CG1", 3), ("CA", "CB", "CG1", "CD1", 3)]},
    "LEU": {"atoms": [("CG", "C", "CH1"), ("CD1", "C", "CH3"), ("CD2", "C", "CH3")],
            "bonds": {"CB-CG": (1.530, 0.020), "CG-CD1": (1.521, 0.020), "CG-CD2": (1.521, 0.020)},
            "angles": {"CA-CB-CG": (116.3, 3.5), "CB-CG-CD1": (110.7, 1.7), "CB-CG-CD2": (110.7, 1.7), "CD1-CG-CD2": (110.8, 2.2)},
            "chi": [("N", "CA", "CB", "CG", 3), ("CA", "CB", "CG", "CD1", 3)]},
    "MET": {"atoms": [("CG", "C", "CH2"), ("SD", "S", "S2"), ("CE", "C", "CH3")],
            "bonds": {"CB-CG": (1.520, 0.020), "CG-SD": (1.807, 0.026), "SD-CE": (1.774, 0.056)},
            "angles": {"CA-CB-CG": (114.1, 2.0), "CB-CG-SD": (112.7, 3.0), "CG-SD-CE": (100.9, 2.2)},
            "chi": [("N", "CA", "CB", "CG", 3), ("CA", "CB", "CG", "SD", 3), ("CB", "CG", "SD", "CE", 3)]},
    "ASP": {"atoms": [("CG", "C", "C"), ("OD1", "O", "O"), ("OD2", "O", "OC")],
            "bonds": {"CB-CG": (1.513, 0.021), "CG-OD1": (1.249, 0.023), "CG-OD2": (1.249, 0.023)},
            "angles": {"CA-CB-CG": (113.4, 2.2), "CB-CG-OD1": (118.4, 2.3), "CB-CG-OD2": (118.4, 2.3), "OD1-CG-OD2": (123.3, 1.9)},
            "planes": [("CB", "CG", "OD1", "OD2")], "chi": [("N", "CA", "CB", "CG", 3), ("CA", "CB", "CG", "OD1", 2)]},
    "ASN": {"atoms": [("CG", "C", "C"), ("OD1", "O", "O"), ("ND2", "N", "NH2")],
            "bonds": {"CB-CG": (1.506, 0.023), "CG-OD1": (1.235, 0.022), "CG-ND2": (1.324, 0.025)},
            "angles": {"CA-CB-CG": (112.6, 1.0), "CB-CG-OD1": (120.8, 2.0), "CB-CG-ND2": (116.4, 1.5), "OD1-CG-ND2": (122.6, 1.0)},
            "planes": [("CB", "CG", "OD1", "ND2")], "chi": [("N", "CA", "CB", "CG", 3), ("CA", "CB", "CG", "OD1", 2)]},
    "GLU": {"atoms": [("CG", "C", "CH2"), ("CD", "C", "C"), ("OE1", "O", "O"), ("OE2", "O", "OC")],
            "bonds": {"CB-CG": (1.517, 0.019), "CG-CD": (1.515, 0.015), "CD-OE1": (1.252, 0.011), "CD-OE2": (1.252, 0.011)},
            "angles": {"CA-CB-CG": (114.1, 2.0), "CB-CG-CD": (113.3, 2.0), "CG-CD-OE1": (118.4, 2.0), "CG-CD-OE2": (118.4, 2.0), "OE1-CD-OE2": (123.3, 1.2)},
            "planes": [("CG", "CD", "OE1", "OE2")],
            "chi": [("N", "CA", "CB", "CG", 3), ("CA", "CB", "CG", "CD", 3), ("CB", "CG", "CD", "OE1", 2)]},
    "GLN": {"atoms": [("CG", "C", "CH2"), ("CD", "C", "C"), ("OE1", "O", "O"), ("NE2", "N", "NH2")],
            "bonds": {"CB-CG": (1.520, 0.030), "CG-CD": (1.506, 0.023), "CD-OE1": (1.235, 0.022), "CD-NE2": (1.324, 0.025)},
            "angles": {"CA-CB-CG": (114.1, 2.0), "CB-CG-CD": (112.6, 1.7), "CG-CD-OE1": (120.8, 2.0), "CG-CD-NE2": (116.4, 1.5), "OE1-CD-NE2": (122.6, 1.0)},
            "planes": [("CG", "CD", "OE1", "NE2")],
            "chi": [("N", "CA", "CB", "CG", 3), ("CA", "CB", "CG", "CD", 3), ("CB", "CG", "CD", "OE1", 2)]},
    "LYS": {"atoms": [("CG", "C", "CH2"), ("CD", "C", "CH2"), ("CE", "C", "CH2"), ("NZ", "N", "NT3")],
            "bonds": {"CB-CG": (1.520, 0.030), "CG-CD": (1.520, 0.030), "CD-CE": (1.520, 0.030), "CE-NZ": (1.489, 0.030)},
            "angles": {"CA-CB-CG": (114.1, 2.0), "CB-CG-CD": (111.3, 2.3), "CG-CD-CE": (111.3, 2.3), "CD-CE-NZ": (111.9, 3.2)},
            "chi": [("N", "CA", "CB", "CG", 3), ("CA", "CB", "CG", "CD", 3), ("CB", "CG", "CD", "CE", 3), ("CG", "CD", "CE", "NZ", 3)]},
    "ARG": {"atoms": [("CG", "C", "CH2"), ("CD", "C", "CH2"), ("NE", "N", "NC1"), ("CZ", "C", "C"), ("NH1", "N", "NC2"), ("NH2", "N", "NC2")],
            "bonds": {"CB-CG": (1.521, 0.027), "CG-CD": (1.515, 0.025), "CD-NE": (1.460, 0.017), "NE-CZ": (1.326, 0.013),
                      "CZ-NH1": (1.326, 0.013), "CZ-NH2": (1.326, 0.013)},
            "angles": {"CA-CB-CG": (114.1, 2.0), "CB-CG-CD": (111.3, 2.3), "CG-CD-NE": (112.0, 2.2), "CD-NE-CZ": (124.2, 1.5),
                       "NE-CZ-NH1": (120.0, 1.9), "NE-CZ-NH2": (120.0, 1.9), "NH1-CZ-NH2": (119.7, 1.8)},
            "planes": [("CD", "NE", "CZ", "NH1", "NH2")],
            "chi": [("N", "CA", "CB", "CG", 3), ("CA", "CB", "CG", "CD", 3), ("CB", "CG", "CD", "NE", 3), ("CG", "CD", "NE", "CZ", 3)]},
    "HIS": {"atoms": [("CG", "C", "CR5"), ("ND1", "N", "NR15"), ("CD2", "C", "CR15"), ("CE1", "C", "CR15"), ("NE2", "N", "NR15")],
            "bonds": {"CB-CG": (1.497, 0.014), "CG-ND1": (1.379, 0.010), "CG-CD2": (1.356, 0.011), "ND1-CE1": (1.323, 0.015),
                      "CD2-NE2": (1.373, 0.011), "CE1-NE2": (1.317, 0.011)},
            "angles": {"CA-CB-CG": (113.8, 1.0), "CB-CG-ND1": (122.7, 1.5), "CB-CG-CD2": (131.4, 1.2), "ND1-CG-CD2": (105.9, 1.3),
                       "CG-ND1-CE1": (109.3, 1.7), "CG-CD2-NE2": (107.6, 1.1), "ND1-CE1-NE2": (108.3, 1.3), "CD2-NE2-CE1": (108.9, 2.2)},
            "planes": [("CB", "CG", "ND1", "CD2", "CE1", "NE2")], "chi": [("N", "CA", "CB", "CG", 3), ("CA", "CB", "CG", "ND1", 2)]},
    "PHE": {"atoms": [("CG", "C", "CR6"), ("CD1", "C", "CR16"), ("CD2", "C", "CR16"), ("CE1", "C", "CR16"), ("CE2", "C", "CR16"), ("CZ", "C", "CR16")],
            "bonds": {"CB-CG": (1.502, 0.023), "CG-CD1": (1.384, 0.021), "CG-CD2": (1.384, 0.021), "CD1-CE1": (1.388, 0.020),
                      "CD2-CE2": (1.388, 0.020), "CE1-CZ": (1.382, 0.030), "CE2-CZ": (1.382, 0.030)},
            "angles": {"CA-CB-CG": (113.8, 1.0), "CB-CG-CD1": (120.7, 1.7), "CB-CG-CD2": (120.7, 1.7), "CD1-CG-CD2": (118.6, 1.5),
                       "CG-CD1-CE1": (120.7, 1.8), "CG-CD2-CE2": (120.7, 1.8), "CD1-CE1-CZ": (120.1, 1.2), "CD2-CE2-CZ": (120.1, 1.2),
                       "CE1-CZ-CE2": (120.0, 1.8)},
            "planes": [("CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ")], "chi": [("N", "CA", "CB", "CG", 3), ("CA", "CB", "CG", "CD1", 2)]},
    "TYR": {"atoms": [("CG", "C", "CR6"), ("CD1", "C", "CR16"), ("CD2", "C", "CR16"), ("CE1", "C", "CR16"), ("CE2", "C", "CR16"),
                      ("CZ", "C", "CR6"), ("OH", "O", "OH1")],
            "bonds": {"CB-CG": (1.512, 0.015), "CG-CD1": (1.387, 0.013), "CG-CD2": (1.387, 0.013), "CD1-CE1": (1.389, 0.015),
                      "CD2-CE2": (1.389, 0.015), "CE1-CZ": (1.381, 0.013), "CE2-CZ": (1.381, 0.013), "CZ-OH": (1.376, 0.021)},
            "angles": {"CA-CB-CG": (113.9, 1.8), "CB-CG-CD1": (120.8, 1.5), "CB-CG-CD2": (120.8, 1.5), "CD1-CG-CD2": (118.4, 1.0),
                       "CG-CD1-CE1": (121.2, 1.5), "CG-CD2-CE2": (121.2, 1.5), "CD1-CE1-CZ": (119.6, 1.8), "CD2-CE2-CZ": (119.6, 1.8),
                       "CE1-CZ-CE2": (119.9, 1.1), "CE1-CZ-OH": (120.1, 2.7), "CE2-CZ-OH": (120.1, 2.7)},
            "planes": [("CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "OH")], "chi": [("N", "CA", "CB", "CG", 3), ("CA", "CB", "CG", "CD1", 2)]},
    "TRP": {"atoms": [("CG", "C", "CR5"), ("CD1", "C", "CR15"), ("CD2", "C", "CR56"), ("NE1", "N", "NR15"), ("CE2", "C", "CR56"),
                      ("CE3", "C", "CR16"), ("CZ2", "C", "CR16"), ("CZ3", "C", "CR16"), ("CH2", "C", "CR16")],
            "bonds": {"CB-CG": (1.498, 0.031), "CG-CD1": (1.365, 0.025), "CG-CD2": (1.433, 0.018), "CD1-NE1": (1.374, 0.021),
                      "NE1-CE2": (1.370, 0.011), "CD2-CE2": (1.409, 0.012), "CD2-CE3": (1.398, 0.016), "CE2-CZ2": (1.394, 0.021),
                      "CE3-CZ3": (1.382, 0.030), "CZ2-CH2": (1.369, 0.019), "CZ3-CH2": (1.400, 0.025)},
            "angles": {"CA-CB-CG": (113.6, 1.9), "CB-CG-CD1": (126.9, 1.5), "CB-CG-CD2": (126.6, 1.3), "CD1-CG-CD2": (106.3, 0.8),
                       "CG-CD1-NE1": (110.1, 1.0), "CD1-NE1-CE2": (109.0, 0.9), "NE1-CE2-CD2": (107.3, 1.0), "CG-CD2-CE2": (107.3, 0.8),
                       "CG-CD2-CE3": (133.9, 0.9), "CE2-CD2-CE3": (118.7, 1.2), "CD2-CE2-CZ2": (122.3, 1.2), "NE1-CE2-CZ2": (130.4, 1.1),
                       "CD2-CE3-CZ3": (118.8, 1.3), "CE2-CZ2-CH2": (117.4, 1.0), "CE3-CZ3-CH2": (121.2, 1.1), "CZ2-CH2-CZ3": (121.6, 1.2)},
            "planes": [("CB", "CG", "CD1", "CD2", "NE1", "CE2", "CE3", "CZ2", "CZ3", "CH2")],
            "chi": [("N", "CA", "CB", "CG", 3), ("CA", "CB", "CG", "CD1", 2)]},
    "PRO": {"atoms": [("CG", "C", "CH2"), ("CD", "C", "CH2")],
            "bonds": {"CB-CG": (1.495, 0.050), "CG-CD": (1.502, 0.033), "N-CD": (1.474, 0.014)},
            "angles": {"CA-CB-CG": (104.8, 1.9), "CB-CG-CD": (106.5, 3.9), "N-CD-CG": (103.2, 1.5), "CA-N-CD": (111.7, 1.4)},
            "chi": [("N", "CA", "CB", "CG", 3), ("CA", "CB", "CG", "CD", 3)]},
}
BUILTIN_RESIDUES = tuple(sorted(_SIDE)) + ("HOH",)
PLANE_ESD = 0.02  # Å
CHI_ESD = {3: 15.0, 2: 20.0}  # degrees, staggered sp3-sp3 / sp3-sp2 torsions
OMEGA = (180.0, 5.0)


def _main_values(res: str) -> dict:
    vals = dict(_MAIN["general"])
    vals.update(_MAIN["beta"] if res in ("ILE", "THR", "VAL") else _MAIN.get(res, {}))
    vals.update(_OXT)
    return vals


def _comp_rows(res: str):
    """(atoms, bonds, angles, chirals, planes, torsions) of one residue as tuples."""
    side = _SIDE[res]
    atoms = list(_MAIN_ATOMS)
    if res == "GLY":
        atoms[1] = ("CA", "C", "CH2")
    if res == "PRO":
        atoms[0] = ("N", "N", "NH0")
    if res != "GLY":
        atoms.append(("CB", "C", side.get("cb", "CH2" if res != "ALA" else "CH3")))
    atoms += side["atoms"]
    names = {a[0] for a in atoms}
    main = _main_values(res)
    bonds = [(k, v) for k, v in main.items() if k.count("-") == 1 and set(k.split("-")) <= names] + list(side["bonds"].items())
    angles = [(k, v) for k, v in main.items() if k.count("-") == 2 and set(k.split("-")) <= names] + list(side["angles"].items())
    chirals = ([("CA", "N", "C", "CB", "positive")] if res != "GLY" else []) + side.get("chir", [])
    planes = [("C", "CA", "O", "OXT")] + side.get("planes", [])
    tors = [(f"chi{i + 1}", t[:4], 180.0 if t[4] == 3 else (90.0 if res in ("PHE", "TYR", "TRP", "HIS") else 0.0), CHI_ESD[t[4]], t[4])
            for i, t in enumerate(side.get("chi", []))]
    return atoms, bonds, angles, chirals, planes, tors


def _loop(tag, cols, rows):
    out = ["loop_"] + [f"_{tag}.{c}" for c in cols]
    out += [" ".join(str(x) for x in r) for r in rows]
    return "\n".join(out) + "\n"


@lru_cache(maxsize=1)
def builtin_monlib_cif() -> str:
    """The built-in dictionary as CCP4 monomer-library mmCIF text (chem_comps and peptide links)."""
    comps = [(r, r, "peptide" if r != "PRO" else "P-peptide") for r in sorted(_SIDE)] + [("HOH", "HOH", "non-polymer")]
    parts = ["data_comp_list\n" + _loop("chem_comp", ["id", "three_letter_code", "name", "group", "number_atoms_all", "number_atoms_nh", "desc_level"],
                                        [(c, t, c, g, 0, 0, ".") for c, t, g in comps])]
    for res in sorted(_SIDE):
        atoms, bonds, angles, chirals, planes, tors = _comp_rows(res)
        block = [f"data_comp_{res}"]
        block.append(_loop("chem_comp_atom", ["comp_id", "atom_id", "type_symbol", "type_energy"], [(res, *a) for a in atoms]))
        block.append(_loop("chem_comp_bond", ["comp_id", "atom_id_1", "atom_id_2", "type", "value_dist", "value_dist_esd"],
                           [(res, *k.split("-"), "single", *v) for k, v in bonds]))
        block.append(_loop("chem_comp_angle", ["comp_id", "atom_id_1", "atom_id_2", "atom_id_3", "value_angle", "value_angle_esd"],
                           [(res, *k.split("-"), *v) for k, v in angles]))
        if tors:
            block.append(_loop("chem_comp_tor", ["comp_id", "id", "atom_id_1", "atom_id_2", "atom_id_3", "atom_id_4", "value_angle", "value_angle_esd", "period"],
                               [(res, t[0], *t[1], t[2], t[3], t[4]) for t in tors]))
        if chirals:
            block.append(_loop("chem_comp_chir", ["comp_id", "id", "atom_id_centre", "atom_id_1", "atom_id_2", "atom_id_3", "volume_sign"],
                               [(res, f"chir_{i + 1}", *c) for i, c in enumerate(chirals)]))
        block.append(_loop("chem_comp_plane_atom", ["comp_id", "plane_id", "atom_id", "dist_esd"],
                           [(res, f"plan-{i + 1}", a, PLANE_ESD) for i, p in enumerate(planes) for a in p]))
        parts.append("\n".join(block))
    parts.append("data_comp_HOH\n" + _loop("chem_comp_atom", ["comp_id", "atom_id", "type_symbol", "type_energy"], [("HOH", "O", "O", "OH2")]))
    links = [("TRANS", PEPTIDE, "peptide", 180.0), ("CIS", PEPTIDE, "peptide", 0.0),
             ("PTRANS", PEPTIDE_PRO, "P-peptide", 180.0), ("PCIS", PEPTIDE_PRO, "P-peptide", 0.0)]
    parts.append("data_link_list\n" + _loop("chem_link", ["id", "comp_id_1", "mod_id_1", "group_comp_1", "comp_id_2", "mod_id_2", "group_comp_2", "name"],
                                            [(name, ".", ".", "peptide", ".", ".", group, name) for name, _, group, _ in links]))
    for name, vals, group, omega in links:
        block = [f"data_link_{name}"]
        block.append(_loop("chem_link_bond", ["link_id", "atom_1_comp_id", "atom_id_1", "atom_2_comp_id", "atom_id_2", "type", "value_dist", "value_dist_esd"],
                           [(name, 1, "C", 2, "N", "single", *vals["C-N"])]))
        ang = [(1, "CA", 1, "C", 2, "N", *vals["CA-C-N"]), (1, "O", 1, "C", 2, "N", *vals["O-C-N"]), (1, "C", 2, "N", 2, "CA", *vals["C-N-CA"])]
        if "C-N-CD" in vals:
            ang.append((1, "C", 2, "N", 2, "CD", *vals["C-N-CD"]))
        block.append(_loop("chem_link_angle", ["link_id", "atom_1_comp_id", "atom_id_1", "atom_2_comp_id", "atom_id_2", "atom_3_comp_id", "atom_id_3", "value_angle", "value_angle_esd"],
                           [(name, *a) for a in ang]))
        block.append(_loop("chem_link_tor", ["link_id", "id", "atom_1_comp_id", "atom_id_1", "atom_2_comp_id", "atom_id_2", "atom_3_comp_id", "atom_id_3",
                                             "atom_4_comp_id", "atom_id_4", "value_angle", "value_angle_esd", "period"],
                           [(name, "omega", 1, "CA", 1, "C", 2, "N", 2, "CA", omega, OMEGA[1], 1)]))
        # the carbonyl plane, and (proline) the planar imide N; split as in REFMAC so that
        # ω deviations are restrained by the ω torsion, not by the planes
        planes = [("plan-1", [(1, "CA"), (1, "C"), (1, "O"), (2, "N")])]
        if group == "P-peptide":
            planes.append(("plan-2", [(1, "C"), (2, "N"), (2, "CA"), (2, "CD")]))
        block.append(_loop("chem_link_plane", ["link_id", "plane_id", "atom_comp_id", "atom_id", "dist_esd"],
                           [(name, pid, c, a, PLANE_ESD) for pid, plane in planes for c, a in plane]))
        parts.append("\n".join(block))
    return "\n".join(parts)


# van der Waals radii (Å) and H-bond types of the energy types above, from CCP4 ener_lib.cif
# (vdwh_radius: the radius of the atom with its riding hydrogens; Vagin et al. 2004)
BUILTIN_VDW = {
    "C": (1.75, "N"), "CH1": (1.95, "N"), "CH2": (1.92, "N"), "CH3": (1.94, "N"), "CR5": (1.74, "N"), "CR6": (1.74, "N"),
    "CR15": (1.74, "N"), "CR16": (1.82, "N"), "CR56": (1.74, "N"), "N": (1.60, "N"), "NH0": (1.60, "N"), "NH1": (1.60, "D"),
    "NH2": (1.60, "D"), "NC1": (1.60, "D"), "NC2": (1.60, "D"), "NT3": (1.60, "D"), "NR15": (1.60, "D"), "O": (1.52, "A"),
    "OC": (1.52, "A"), "OH1": (1.52, "B"), "OH2": (1.52, "B"), "S2": (1.88, "A"), "SH1": (1.95, "B"),
}
