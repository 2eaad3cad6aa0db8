"""Diagnostics: scripts that explain a measurement (python -m msfp_jax.diagnostics.NAME)."""

__all__ = ["device_agreement", "swap_in"]
