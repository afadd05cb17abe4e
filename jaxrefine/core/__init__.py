"""Layer 0: arrays without gemmi (cell, symmetry, hkl, resolution bins) and the plain containers
that io/ fills and xray/ and restraints/ read (form-factor coefficients, padded restraint arrays)."""
