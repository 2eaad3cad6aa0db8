"""matplotlib, the one way msfp_jax uses it: a headless pyplot and a figure saved as PNG.

matplotlib is imported on first use only, so that importing a package that can plot costs nothing.
"""
from __future__ import annotations

import os
import pathlib


def pyplot():
  """matplotlib.pyplot on the Agg backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (optional at import time)
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110) -> str:
  """Lays out `fig`, writes it to `path` (folders created), closes it; returns the path."""
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi)
  pyplot().close(fig)
  return str(path)
