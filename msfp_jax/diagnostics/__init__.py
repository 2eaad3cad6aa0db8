"""Diagnostics: scripts that explain a measurement (python -m msfp_jax.diagnostics.NAME)."""
