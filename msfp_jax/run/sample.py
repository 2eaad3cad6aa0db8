"""The sample stage: every model from the same noise, their differences to the FP model, and the grid PNG.

Writes samples/<model>.npz, samples/summary.json (sample MSE and PSNR vs FP, teacher-forced eps error), samples/
per_step_eps_errors.json with its PNG, and samples_side_by_side.png. A model's samples are kept while they were
computed from its current inputs (msfp_jax.stage_inputs): extending fine-tuning samples the fine-tuned model
again and keeps the others.
"""
from __future__ import annotations

import pathlib
import time

import jax
import numpy as np
from absl import logging

from msfp_jax import checkpoint, plotting, stage_inputs
from msfp_jax.evaluation import paired
from msfp_jax.run.models import MODELS, Models, sampler_eps
from msfp_jax.train import pipeline

SAMPLES_DIR = "samples"
SAMPLES_SUMMARY = "samples/summary.json"
PER_STEP_ERRORS = "per_step_eps_errors.json"  # under SAMPLES_DIR
SIDE_BY_SIDE = "samples_side_by_side.png"
PER_STEP_ERRORS_PLOT = "per_step_eps_errors.png"


def _stored(config, workdir: pathlib.Path) -> tuple[dict, dict, dict[str, list[str]]]:
  """(the stored summary, each model's inputs now, the models whose samples are still to compute: see
  stage_inputs.pending)."""
  summary_path = workdir / SAMPLES_SUMMARY
  previous = checkpoint.load_json(summary_path) if summary_path.is_file() else {}
  recorded = previous.get(stage_inputs.INPUTS_KEY) or {}
  current = {name: stage_inputs.sample_inputs(config, workdir, name) for name in MODELS}
  stored = {name: recorded.get(name) for name in MODELS
            if previous and (workdir / SAMPLES_DIR / f"{name}.npz").is_file()}
  return previous, current, stage_inputs.pending(current, stored)


def is_done(config, workdir) -> bool:
  return not _stored(config, pathlib.Path(workdir))[2]


def run_sample(config, workdir, models: Models | None = None) -> dict:
  """Samples the models whose samples are not current, from the same noise; writes samples/<model>.npz, the grid
  PNG and summary.json, and returns the summary. (msfp_jax.run.job skips the stage when all are current.)"""
  workdir = pathlib.Path(workdir)
  previous, inputs, todo = _stored(config, workdir)
  for name, changed in todo.items():
    stage_inputs.announce(f"sample {name}", changed)
  models = models or Models(config, workdir)
  n = int(config.sample.num_images)
  x_T, labels, rng = models.fixed_noise(n)
  outputs, timings = {}, dict(previous.get("seconds", {}))
  for name in MODELS:
    if name not in todo:
      outputs[name] = np.load(workdir / SAMPLES_DIR / f"{name}.npz")["images"]
      continue
    start = time.time()
    outputs[name] = np.clip(models.sample(name, x_T, labels, rng), -1.0, 1.0)
    timings[name] = time.time() - start
    if not np.isfinite(outputs[name]).all():
      raise FloatingPointError(f"The {name} model produced NaN/Inf samples; check its calibration "
                               "(a layer may need more bits: see config.quant.high_precision_paths).")
    (workdir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    np.savez(workdir / SAMPLES_DIR / f"{name}.npz", images=outputs[name],
             labels=np.asarray([] if labels is None else labels))
    logging.info("sample: %s done in %.1fs", name, timings[name])
  q, s = config.quant, config.sampler
  plotting.save_side_by_side({"FP": outputs["fp"], f"PTQ W{q.weight_bits}A{q.act_bits}": outputs["ptq"],
                              f"fine-tuned W{q.weight_bits}A{q.act_bits}": outputs["finetuned"]},
                             workdir / SIDE_BY_SIDE, title=f"same noise, {s.kind.upper()} {s.num_steps} steps")
  forced = per_step_errors(models, ("ptq", "finetuned"), x_T, labels, rng, int(config.sample.num_teacher_forced))
  checkpoint.save_json(workdir / SAMPLES_DIR / PER_STEP_ERRORS, forced)
  paired.plot_per_step_errors(forced, workdir / PER_STEP_ERRORS_PLOT,
                              title=f"teacher-forced along {forced['num_trajectories']} FP trajectories, "
                                    f"{s.kind.upper()} {s.num_steps} steps")
  quantized = [name for name in MODELS if name != "fp"]
  summary = {
      "num_images": n, "seed": int(config.seed),
      "sample_mse_vs_fp": {name: float(np.mean((outputs[name] - outputs["fp"]) ** 2)) for name in MODELS},
      "sample_psnr_vs_fp": {name: paired.psnr(outputs[name], outputs["fp"]) for name in quantized},
      "mean_eps_mse_vs_fp": {name: float(np.mean(forced[name]["eps_mse"])) for name in quantized},
      "mean_x_prev_mse_vs_fp": {name: float(np.mean(forced[name]["x_prev_mse"])) for name in quantized},
      "seconds": timings, stage_inputs.INPUTS_KEY: inputs,
  }
  checkpoint.save_json(workdir / SAMPLES_SUMMARY, summary)
  return summary


def per_step_errors(models: Models, names, x_T, labels, rng, num_trajectories: int) -> dict:
  """Teacher forcing: the eps error of the models `names` at every step of the FP model's trajectories from
  the first num_trajectories of x_T (evaluation.paired.per_step_eps_errors), with the trajectory count."""
  k = max(1, min(int(num_trajectories), len(x_T)))
  x_T = np.asarray(x_T)[:k]
  labels = None if labels is None else np.asarray(labels)[:k]
  trajectory = pipeline.TeacherSampler(models.bundle, models.schedule, models.sampler_config)(x_T, labels, rng)
  eps = {name: jax.jit(sampler_eps(models.apply_fn(name), models.bundle, labels)) for name in ("fp", *names)}
  errors = paired.per_step_eps_errors({name: eps[name] for name in names}, eps["fp"], trajectory.xs,
                                      trajectory.ts, trajectory.gammas)
  return {**errors, "num_trajectories": k}
