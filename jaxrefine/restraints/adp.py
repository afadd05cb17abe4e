"""ADP (B-factor) similarity restraints between bonded and 1-3 neighbours.

E = Σ mask ((B_i − B_j)/σ_ij)² with σ = 1.5 Å² for bonded pairs and 2.0 Å² for angle (1-3) pairs
(the isotropic B restraints of REFMAC5; Murshudov et al. 1997, Acta Cryst. D53, 240, eq. 17).
"""
from __future__ import annotations

import jax.numpy as jnp

from ..core.restraint_terms import Restraints


def adp_energy(b_iso, restraints: Restraints, weight=1.0):
    """Weighted B-similarity energy; b_iso (n,) Å²; weight scalar (0 switches it off)."""
    adp = restraints.adp
    z = (b_iso[adp.idx[:, 0]] - b_iso[adp.idx[:, 1]]) / adp.sigma
    return weight * jnp.sum(adp.mask * z * z)
