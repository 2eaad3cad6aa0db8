"""Beta schedules of discrete-time diffusion models.

All arrays are float64 numpy: the sampler derives its per-step coefficients from them once, in float64,
and only then casts to float32 (as the DDIM reference code does in float64 via torch).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

SCHEDULE_KINDS = ("linear", "cosine", "scaled_linear")


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """A discrete diffusion noise schedule.

  Attributes:
    kind: how the betas were made ("linear", "cosine", "scaled_linear" or "custom").
    betas: float64 [T], beta_t for t = 0..T-1.
    alphas_cumprod: float64 [T], alpha_bar_t = prod_{s <= t} (1 - beta_s).
  """
  kind: str
  betas: np.ndarray = dataclasses.field(repr=False)
  alphas_cumprod: np.ndarray = dataclasses.field(repr=False)

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])

  @property
  def alphas(self) -> np.ndarray:
    return 1.0 - self.betas

  @classmethod
  def from_betas(cls, betas, kind: str = "custom") -> Schedule:
    """A schedule from explicit betas (each in (0, 1))."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
      raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
    if not np.all((betas > 0) & (betas < 1)):
      raise ValueError("every beta must lie in (0, 1); check beta_start/beta_end.")
    betas.setflags(write=False)
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod.setflags(write=False)
    return cls(kind=kind, betas=betas, alphas_cumprod=alphas_cumprod)


def _cosine_betas(num_timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Nichol & Dhariwal (2021) cosine schedule: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi / 2)."""
  def alpha_bar(t):
    return math.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2
  return np.array([
      min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
      for i in range(num_timesteps)
  ], dtype=np.float64)


def make_schedule(kind: str = "linear", num_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> Schedule:
  """Builds a beta schedule.

  Args:
    kind: "linear" (Ho et al.: betas evenly spaced from beta_start to beta_end), "cosine" (Nichol &
      Dhariwal; beta_start/beta_end unused, betas capped at 0.999) or "scaled_linear" (latent diffusion:
      sqrt(beta) evenly spaced, e.g. beta_start=0.00085, beta_end=0.012).
    num_timesteps: T.
    beta_start, beta_end: the first and last beta of the linear schedules.
  """
  if kind not in SCHEDULE_KINDS:
    raise ValueError(f"unknown schedule kind {kind!r}; choose one of {SCHEDULE_KINDS}.")
  if int(num_timesteps) != num_timesteps or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}.")
  num_timesteps = int(num_timesteps)
  if kind == "cosine":
    betas = _cosine_betas(num_timesteps)
  else:
    if not 0 < beta_start <= beta_end < 1:
      raise ValueError(
          f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}.")
    if kind == "linear":
      betas = np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    else:
      betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=np.float64) ** 2
  return Schedule.from_betas(betas, kind=kind)
