"""X-ray model: form factors, structure factors, bulk solvent, scaling, targets, maps (pure JAX)."""
