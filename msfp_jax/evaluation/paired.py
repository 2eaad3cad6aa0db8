"""Paired metrics: a quantized model against the FP model from the same noise.

FID at a few hundred samples is mostly noise (it moves by about 10 between seeds on the digits model); a
model's error against the FP model's own outputs from the same starting noise is not, because the noise
cancels. Three such numbers, each a cheap function of arrays the callers already have:

* `psnr`: of the samples against the FP samples from the same noise, from the MSE over all of them (a mean of
  per-image PSNRs would be +inf as soon as one sample equals its FP sample, as saturated samples of an
  under-trained model often do);
* `per_step_eps_errors`: teacher forcing along FP trajectories, the error of the model's eps at each visited
  step, plain and weighted by gamma_t^2 (an eps error d moves the next sample by gamma_t d, so gamma_t^2 times
  the eps MSE is the MSE it adds to x_prev);
* the Frechet distance between the Inception features of the quantized and the FP samples ("FD to FP"), which
  `stats.frechet_distance` computes from the two evaluations' statistics.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import jax
import numpy as np

from msfp_jax import plotting


def psnr_from_mse(mse: float, *, peak_to_peak: float = 2.0) -> float:
  """10 log10(peak_to_peak^2 / MSE); +inf for MSE 0."""
  return math.inf if mse == 0 else float(10.0 * math.log10(peak_to_peak ** 2 / mse))


def psnr(images, reference, *, peak_to_peak: float = 2.0) -> float:
  """10 log10(peak_to_peak^2 / MSE) of a batch against `reference` (same shape; [-1, 1] images have
  peak_to_peak 2), with the MSE over every pixel of every sample; +inf only for identical batches."""
  images = np.asarray(images, np.float64)
  reference = np.asarray(reference, np.float64)
  if images.shape != reference.shape or images.ndim < 2:
    raise ValueError(f"psnr needs two batches of the same shape, got {images.shape} and {reference.shape}.")
  return psnr_from_mse(float(np.mean((images - reference) ** 2)), peak_to_peak=peak_to_peak)


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
  many = len(names) > 4  # an ablation's rows: one legend beside the plots instead of one over each
  if many:
    fig, (*axes, legend_axis) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 0.55]})
  else:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for ax, key, label in ((axes[0], "eps_mse", "eps MSE vs FP (teacher-forced)"),
                         (axes[1], "x_prev_mse", "gamma_t^2 x eps MSE (error added to x_prev)")):
    for name in names:
      ax.plot(errors["t"], errors[name][key], marker=".", label=name)
    ax.set_xlabel("t")
    ax.set_yscale("log")
    ax.set_title(label, fontsize=9)
    ax.invert_xaxis()  # sampling runs from large t to small t
    if not many:
      ax.legend(fontsize=8)
  if many:
    legend_axis.axis("off")
    legend_axis.legend(*axes[0].get_legend_handles_labels(), loc="center left", fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  return plotting.save_figure(fig, path)


WEIGHTINGS = ("abs", "square", "none")  # DFA's |gamma_t|, gamma_t^2, and plain MSE


def swap_in_costs(sample_with: Callable, reference_eps: Callable, candidate_eps: Callable, ts, gammas,
                  block_size: int) -> dict:
  """What each block of sampler steps costs: the candidate model swapped in for one block at a time.

  Args:
    sample_with: eps_fn -> x_0 from fixed noise (the same noise and sampler for every call).
    reference_eps, candidate_eps: the FP and the quantized model's eps_fn(x, t).
    ts, gammas: the sampler's visited timesteps (descending) and their gamma_t.
    block_size: consecutive visited steps per block.
  Returns:
    {"blocks": [{"t_max", "t_min", "steps", "sample_mse", "cost_share", "weight_share": {weighting: share}}],
     "all_steps_mse": the MSE with the candidate at every step, "sum_of_blocks_mse": ...}. The cost share is
    the block's sample MSE over the sum of all blocks'; a weighting's share is the fraction of the
    fine-tuning loss weight that falls on the block's steps (how well the loss weights the real cost).
  """
  ts = [int(t) for t in ts]
  gammas = np.asarray(gammas, np.float64)
  reference = np.asarray(sample_with(reference_eps), np.float64)
  weights = {"abs": np.abs(gammas), "square": gammas ** 2, "none": np.ones_like(gammas)}
  blocks = []
  for start in range(0, len(ts), block_size):
    block = ts[start:start + block_size]
    low, high = min(block), max(block)

    def mixed(x, t, low=low, high=high):
      inside = (t[0] >= low) & (t[0] <= high)
      return jax.lax.cond(inside, candidate_eps, reference_eps, x, t)
    error = float(np.mean((np.asarray(sample_with(mixed), np.float64) - reference) ** 2))
    blocks.append({"t_max": high, "t_min": low, "steps": len(block), "sample_mse": error,
                   "weight_share": {w: float(weights[w][start:start + block_size].sum() / weights[w].sum())
                                    for w in WEIGHTINGS}})
  total = sum(b["sample_mse"] for b in blocks)
  for b in blocks:
    b["cost_share"] = b["sample_mse"] / total if total > 0 else 0.0
  everywhere = float(np.mean((np.asarray(sample_with(candidate_eps), np.float64) - reference) ** 2))
  return {"blocks": blocks, "all_steps_mse": everywhere, "sum_of_blocks_mse": total}


def plot_swap_in(costs: Mapping, path: str | os.PathLike, title: str = "") -> str:
  """PNG: per block of steps, its share of the swap-in cost beside each loss weighting's share."""
  plt = plotting.pyplot()
  blocks = costs["blocks"]
  x = np.arange(len(blocks))
  fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(blocks) + 2), 3.6))
  bars = [("cost (sample MSE)", [b["cost_share"] for b in blocks])]
  bars += [(f"weight {w}", [b["weight_share"][w] for b in blocks]) for w in WEIGHTINGS]
  width = 0.8 / len(bars)
  errors = [b.get("cost_share_std", 0.0) for b in blocks]  # the spread over seeds, when there are several
  for i, (label, values) in enumerate(bars):
    ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, label=label, yerr=errors if i == 0 else None,
           capsize=2)
  ax.set_xticks(x, [f"t {b['t_max']}-{b['t_min']}" for b in blocks], fontsize=7)
  ax.set_ylabel("share")
  ax.legend(fontsize=7)
  ax.set_title(title or "one block of steps quantized at a time: cost vs loss weight", fontsize=9)
  return plotting.save_figure(fig, path)
