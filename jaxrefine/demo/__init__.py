"""Layer 6: the built-in demonstration (a synthetic crystal refined end to end)."""
from .synthetic import make_demo_crystal, perturb, run_demo  # noqa: F401
