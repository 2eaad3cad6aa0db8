"""Pictures, the one way msfp_jax makes them: image grids, a headless pyplot and figures saved as PNG.

A leaf: numpy and matplotlib only (no other msfp_jax module), so that any layer may draw. matplotlib is
imported on first use only, so that importing a package that can plot costs nothing.
"""
from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping

import numpy as np


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


def image_grid(images, columns: int | None = None, *, gap: int = 1, fill: int = 0) -> np.ndarray:
  """[N, H, W, C] images in [-1, 1] -> one uint8 [rows * (H + gap) + gap, columns * (W + gap) + gap, C] grid.

  Row-major; `columns` defaults to ceil(sqrt(N)) (near-square). `gap` pixels of `fill` separate the images and
  frame the grid (gap=0: the images touch, no frame). Values beyond [-1, 1] are clipped; NaN shows as grey.
  """
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = -(-n // columns)
  pixels = np.round((np.clip(np.nan_to_num(images), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
  grid = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, c), fill, np.uint8)
  for k in range(n):
    r, q = divmod(k, columns)
    top, left = gap + r * (h + gap), gap + q * (w + gap)
    grid[top:top + h, left:left + w] = pixels[k]
  return grid


def save_side_by_side(panels: Mapping[str, np.ndarray], path: str | os.PathLike, title: str = "") -> str:
  """One PNG with an image grid per panel (white gaps), titled, side by side: the same cell of two panels shows
  the same noise's image of two models."""
  plt = pyplot()
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
  for ax, (name, images) in zip(axes[0], panels.items()):
    grid = image_grid(images, fill=255)
    ax.imshow(np.repeat(grid, 3, axis=-1) if grid.shape[-1] == 1 else grid, interpolation="nearest")
    ax.set_title(name)
    ax.axis("off")
  if title:
    fig.suptitle(title)
  return save_figure(fig, path, dpi=120)


def plot_router_allocation(bank_per_timestep: np.ndarray, num_banks: int, path: str | os.PathLike,
                           title: str = "") -> str:
  """The TALoRA router's bank for every timestep, as a PNG."""
  plt = pyplot()
  alloc = np.asarray(bank_per_timestep)
  fig, ax = plt.subplots(figsize=(7, 2.2))
  ax.scatter(np.arange(alloc.size), alloc, s=2, c=alloc, cmap="viridis", vmin=0, vmax=max(num_banks - 1, 1))
  ax.set_xlabel("timestep t")
  ax.set_ylabel("LoRA bank")
  ax.set_yticks(range(num_banks))
  ax.set_title(title)
  return save_figure(fig, path, dpi=100)
