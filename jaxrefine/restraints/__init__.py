"""Stereochemical and ADP restraints as pure JAX energies (no gemmi here; see io/topology.py)."""
from .adp import adp_energy
from .bonds import angle_energy, bond_angles, bond_energy, bond_lengths
from .chirals import chiral_energy, chiral_volumes
from .geometry import geometry_energy, geometry_terms
from .nonbonded import NonbondedList, nonbonded_energy, pair_distances
from .planes import plane_distances, plane_energy
from .report import GeometryReport, geometry_report
from ..core.restraint_terms import AdpTerm, AngleTerm, BondTerm, ChiralTerm, GeometryWeights, PlaneTerm, Restraints, TorsionTerm
from .torsions import dihedrals, torsion_energy

__all__ = [
    "AdpTerm", "AngleTerm", "BondTerm", "ChiralTerm", "GeometryReport", "GeometryWeights", "NonbondedList",
    "PlaneTerm", "Restraints", "TorsionTerm", "adp_energy", "angle_energy", "bond_angles", "bond_energy",
    "bond_lengths", "chiral_energy", "chiral_volumes", "dihedrals", "geometry_energy", "geometry_report",
    "geometry_terms", "nonbonded_energy", "pair_distances", "plane_distances", "plane_energy", "torsion_energy",
]
