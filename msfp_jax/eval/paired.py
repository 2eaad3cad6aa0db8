"""Paired metrics: a quantized model against the FP model from the same noise.

FID at a few hundred samples is mostly noise (it moves by about 10 between seeds on the digits model); a
model's error against the FP model's own outputs from the same starting noise is not, because the noise
cancels. Three such numbers, each a cheap function of arrays the callers already have:

* `psnr`: of each sample against the FP sample from the same noise, averaged over samples;
* `per_step_eps_errors`: teacher forcing along FP trajectories, the error of the model's eps at each visited
  step, plain and weighted by gamma_t^2 (an eps error d moves the next sample by gamma_t d, so gamma_t^2 times
  the eps MSE is the MSE it adds to x_prev);
* the Frechet distance between the Inception features of the quantized and the FP samples ("FD to FP"), which
  `stats.frechet_distance` computes from the two evaluations' statistics.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

import numpy as np

from msfp_jax import plotting


def psnr(images, reference, *, peak_to_peak: float = 2.0) -> float:
  """Mean over samples of 10 log10(peak_to_peak^2 / MSE) against `reference` (same shape; [-1, 1] images
  have peak_to_peak 2). A sample equal to its reference counts as +inf, so the FP model's own is inf."""
  images = np.asarray(images, np.float64)
  reference = np.asarray(reference, np.float64)
  if images.shape != reference.shape or images.ndim < 2:
    raise ValueError(f"psnr needs two batches of the same shape, got {images.shape} and {reference.shape}.")
  mse = np.mean((images - reference) ** 2, axis=tuple(range(1, images.ndim)))
  with np.errstate(divide="ignore"):
    return float(np.mean(10.0 * np.log10(peak_to_peak ** 2 / mse)))


def per_step_eps_errors(eps_fns: Mapping[str, Callable], reference_eps: Callable, xs, ts, gammas) -> dict:
  """Teacher-forced eps error of each model at each visited step of FP trajectories.

  Args:
    eps_fns: {name: eps_fn(x, t[B]) -> eps} of the models to measure.
    reference_eps: the FP model's eps_fn.
    xs: [S, B, ...] the FP sampler's x_t at its S visited steps (diffusion.Trajectory.xs).
    ts: [S] the visited timesteps; gammas: [S] their gamma_t.
  Returns:
    {"t": [S], "gamma": [S], name: {"eps_mse": [S], "x_prev_mse": [S] (gamma_t^2 eps_mse)}} as lists.
  """
  xs, ts, gammas = np.asarray(xs), np.asarray(ts), np.asarray(gammas, np.float64)
  if not (len(xs) == len(ts) == len(gammas)):
    raise ValueError(f"xs, ts and gammas must have one entry per step, got {len(xs)}, {len(ts)}, {len(gammas)}.")
  out: dict = {"t": [int(t) for t in ts], "gamma": [float(g) for g in gammas]}
  errors = {name: [] for name in eps_fns}
  for x, t in zip(xs, ts):
    t_batch = np.full((x.shape[0],), t, np.int32)
    want = np.asarray(reference_eps(x, t_batch), np.float64)
    for name, eps_fn in eps_fns.items():
      errors[name].append(float(np.mean((np.asarray(eps_fn(x, t_batch), np.float64) - want) ** 2)))
  for name, values in errors.items():
    out[name] = {"eps_mse": values, "x_prev_mse": [g * g * v for g, v in zip(out["gamma"], values)]}
  return out


def plot_per_step_errors(errors: Mapping, path: str | os.PathLike, title: str = "") -> str:
  """PNG of per_step_eps_errors: eps MSE and gamma_t^2-weighted MSE over t, one line per model."""
  plt = plotting.pyplot()
  names = [k for k, v in errors.items() if isinstance(v, Mapping)]  # the models (other keys: t, gamma, ...)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, key, label in ((axes[0], "eps_mse", "eps MSE vs FP (teacher-forced)"),
                         (axes[1], "x_prev_mse", "gamma_t^2 x eps MSE (error added to x_prev)")):
    for name in names:
      ax.plot(errors["t"], errors[name][key], marker=".", label=name)
    ax.set_xlabel("t")
    ax.set_yscale("log")
    ax.set_title(label, fontsize=9)
    ax.invert_xaxis()  # sampling runs from large t to small t
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  return plotting.save_figure(fig, path)
