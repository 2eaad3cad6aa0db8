"""The one check of a parameter tree against an architecture, and its error.

Converters (msfp_jax.models.convert), `registry.save_converted` and `ldm_unet.load_first_stage` use it; it lives
below all three so that none of them imports another to reach it.
"""
from __future__ import annotations

from typing import Any

from msfp_jax import checkpoint

# The problems of a conversion are sentences: the categories of checkpoint.mismatch_listing joined by this.
SEPARATOR = ". "


class ConversionError(ValueError):
  """A checkpoint cannot be converted: wrong kind of file, other architecture, or keys/shapes that differ."""


def raise_on_tree_mismatch(expected: Any, actual: Any, *, what: str = "parameters") -> None:
  """Raises ConversionError naming missing / unexpected / mis-shaped leaves of `actual` against `expected`."""
  problems = checkpoint.tree_mismatch(expected, actual, separator=SEPARATOR)
  if problems:
    raise ConversionError(f"The {what} do not match the architecture{SEPARATOR}{problems}.")
