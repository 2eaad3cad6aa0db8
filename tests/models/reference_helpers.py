"""Shared by the tests that check Flax models against PyTorch references (tests/models and tests/models/convert):
random reference weights and the error measure. Imported by path (the test folders are no packages)."""
import math

import numpy as np
import torch


def randomize_(model: torch.nn.Module, seed: int, unit_normal: tuple[str, ...] = ()) -> None:
  """Makes every parameter random, zero-initialised ones too, so none is trivially zero or one.

  Matrices and kernels get std 1/sqrt(fan_in), so activations stay O(1) through the network; norm scales
  N(1, 0.3); other vectors (biases, norm offsets) N(0, 0.3); the parameters named in `unit_normal` N(0, 1)
  (a codebook: its rows are looked up, not multiplied).
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name in unit_normal:
        p.copy_(torch.randn(p.shape, generator=gen))
      elif p.ndim >= 2:
        p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:])))
      elif name.endswith("weight") and "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
      else:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def relative_error(a, b) -> float:
  """max |a - b| / max |b|, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())
