"""The ablation table: every variant of config.ablation.variants, for every seed, with the same budgets.

Each (variant, seed) runs in WORKDIR/<variant slug>/seed_<s> (calibrate, fine-tune when the variant is scored
after fine-tuning, then score) and leaves result.json there; a rerun of the same command skips finished pairs,
an interrupted fine-tune resumes from its last checkpoint and an interrupted evaluation from its last round.
The FP model is scored once per seed (WORKDIR/fp/seed_<s>): its samples and Inception features serve every row.

Every result records its inputs (the variant's config and the hashes of the FP model, the FID network and the
reference statistics). A result whose inputs differ from the current ones is never reported: the rerun moves
its folder aside to seed_<s>.stale and computes it again. The table (mean and spread over seeds) is written to
WORKDIR/ablation.md and WORKDIR/ablation.json.
"""
from __future__ import annotations

import copy
import pathlib
import re
import shutil
import time

import numpy as np
from absl import logging

from msfp_jax import checkpoint, config_record, evaluation, metrics, stage_inputs
from msfp_jax.data import digits
from msfp_jax.evaluation import digits_score, paired
from msfp_jax.run import protocol as protocol_lib
from msfp_jax.run.evaluate import fd_to_fp, reference_statistics
from msfp_jax.run.models import Models
from msfp_jax.run.sample import per_step_errors
from msfp_jax.train import calibration, finetune, pipeline

RESULT_FILE = "result.json"
PER_STEP_PLOT = "per_step_eps_errors.png"  # every row's per-step error vs FP, mean over its seeds
# (metric, column title) of the table, in order; a column no row has is left out.
TABLE_COLUMNS = (("fid", "FID"), ("sfid", "sFID"), ("is", "IS"), ("fd_to_fp", "FD to FP"), ("pixel_fd", "pixel FD"),
                 ("sample_mse_vs_fp", "sample MSE vs FP"), ("sample_psnr_vs_fp", "PSNR vs FP (dB)"),
                 ("eps_mse_vs_fp", "eps MSE vs FP"))


def slug(name: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def variant_config(config, overrides, seed: int):
  """The base experiment with a variant's overrides and a seed (calibration and fine-tuning noise follow it)."""
  variant = copy.deepcopy(config)
  variant.unlock()
  del variant["ablation"]
  for field, value in overrides:
    node = variant
    *parents, leaf = field.split(".")
    for parent in parents:
      node = node[parent]
    if leaf not in node:
      raise ValueError(f"Ablation override {field!r} names no config field.")
    node[leaf] = value
  variant.seed = int(seed)
  variant.calibration.seed = int(seed) + 1
  variant.lock()
  return variant


def fp_row_inputs(base, fp_dir: pathlib.Path) -> dict:
  """What the FP row of a seed is computed from: the sampling, evaluation and sample-grid fields, and the hashes
  of the FP model, the FID network and the reference statistics."""
  return stage_inputs.normalized({**stage_inputs.eval_inputs(base, fp_dir, "fp"),
                                  **stage_inputs.config_fields(base, stage_inputs.SAMPLE_FIELDS)})


# What a row scored after calibration (PTQ) does not read.
PTQ_UNREAD_PREFIXES = ("finetune.", "lora.")


def row_inputs(variant, variant_dir: pathlib.Path, scored: str) -> dict:
  """What a variant row is computed from: the FP row's inputs and every field of the variant's config that shapes
  its numbers (config_record.ABLATION_ROW; the FID network and reference files by their contents; a PTQ row's
  without the fine-tuning fields)."""
  fields = config_record.kept_fields(config_record.json_config(variant), config_record.ABLATION_ROW)
  fields = {k: v for k, v in fields.items() if k not in stage_inputs.EVAL_PATH_FIELDS
            and not (scored == "ptq" and k.startswith(PTQ_UNREAD_PREFIXES))}
  return stage_inputs.normalized({**fp_row_inputs(variant, variant_dir), **fields})


def current_result(directory: pathlib.Path, inputs: dict) -> dict | None:
  """The stored result in `directory` when it was computed from `inputs`; None when there is none or it is
  stale (then the folder is moved aside to <name>.stale, replacing an older one, so that nothing in it is
  reused)."""
  path = directory / RESULT_FILE
  if not path.is_file():
    return None
  result = checkpoint.load_json(path)
  changed = stage_inputs.changes(result.get(stage_inputs.INPUTS_KEY), inputs)
  if not changed:
    return result
  stale = directory.with_name(directory.name + ".stale")
  print(f"Ablation: {directory} was computed from other inputs ({'; '.join(changed)}); moving it to {stale} and "
        "computing it again.", flush=True)
  if stale.exists():
    shutil.rmtree(stale)
  directory.rename(stale)
  directory.mkdir(parents=True)
  return None


def _stored_if_current(directory: pathlib.Path, inputs: dict) -> dict | None:
  """The stored result when it is current (read only: the table reports nothing stale)."""
  path = directory / RESULT_FILE
  if not path.is_file():
    return None
  result = checkpoint.load_json(path)
  return None if stage_inputs.changes(result.get(stage_inputs.INPUTS_KEY), inputs) else result


def _sample_images(models: Models, name: str, config) -> np.ndarray:
  x_T, labels, rng = models.fixed_noise(int(config.sample.num_images))
  return np.clip(models.sample(name, x_T, labels, rng), -1.0, 1.0)


def _score(models: Models, name: str, config, workdir: pathlib.Path, fp_images: np.ndarray, inception, reference,
           fp_statistics: pathlib.Path | None = None) -> dict:
  """The paired metrics against the FP model from the same noise (sample MSE, PSNR, teacher-forced eps MSE per
  step, FD to FP once the FP evaluation exists), pixel FD for the built-in model, FID / sFID / IS.

  `reference`: (statistics, what they are of), as run.evaluate.reference_statistics returns them."""
  images = _sample_images(models, name, config)
  result = {"sample_mse_vs_fp": float(np.mean((images - fp_images) ** 2))}
  if name != "fp":
    x_T, labels, rng = models.fixed_noise(int(config.sample.num_images))
    forced = per_step_errors(models, (name,), x_T, labels, rng, int(config.sample.num_teacher_forced))
    result["per_step"] = {"t": forced["t"], "gamma": forced["gamma"], **forced[name]}
    result["eps_mse_vs_fp"] = float(np.mean(forced[name]["eps_mse"]))
    result["x_prev_mse_vs_fp"] = float(np.mean(forced[name]["x_prev_mse"]))
  if config.model.path == pipeline.BUILTIN_MODEL:
    # A distribution-level score that needs no Inception network: the built-in model's held-out digits.
    held_out, _ = digits.load_split("test")
    result["pixel_fd"] = digits_score.pixel_frechet_distance(images, held_out)
  if inception is not None:
    statistics, reference_name = reference
    labels = models.eval_labels(int(config.evaluation.num_samples), protocol_lib.eval_seed(config))
    protocol = protocol_lib.eval_protocol(config, reference=reference_name, class_labels=labels is not None)
    scores = evaluation.evaluate(models.sample_fn(name), int(config.evaluation.num_samples), workdir, name=name,
                               batch_size=int(config.evaluation.batch_size), inception=inception,
                               reference=statistics, pipeline=config.evaluation.fid_pipeline, protocol=protocol,
                               labels=labels)
    found = scores.get("metrics", {})
    result.update({key: found[metric] for key, metric in (("fid", "fid"), ("sfid", "sfid"), ("is", "inception_score"))
                   if found.get(metric) is not None})
    if fp_statistics is not None:
      distance = fd_to_fp(pathlib.Path(workdir) / "eval" / name / "statistics.npz", fp_statistics)
      if distance is not None:
        result["fd_to_fp"] = distance
  return result


def _selected(config) -> tuple[list, list[int]]:
  """(the variants config.ablation.only selects, the seeds)."""
  variants = [v for v in config.ablation.variants if not config.ablation.only or v[0] in config.ablation.only]
  if config.ablation.only and len(variants) != len(config.ablation.only):
    known = [v[0] for v in config.ablation.variants]
    raise ValueError(f"config.ablation.only names unknown variants; known: {known}")
  return variants, [int(s) for s in config.ablation.seeds]


def summarize_finished(config, workdir) -> dict:
  """The table of the rows whose results are current, computing nothing (`--mode=report`)."""
  variants, seeds = _selected(config)
  return summarize(config, pathlib.Path(workdir), variants, seeds)


def run_ablation(config, workdir) -> dict:
  """Every (variant, seed) of config.ablation not finished yet, then the table."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  variants, seeds = _selected(config)
  path = stage_inputs.inception_path(config)
  inception = reference = None
  if path is not None and path.is_file():
    inception = evaluation.load_inception(path)
  else:
    why = "config.evaluation.inception is empty" if path is None else f"the FID network file {path} is absent"
    print(f"Ablation: {why}, so FID/sFID/IS are not reported, only sample MSE vs FP (and pixel FD for the "
          "built-in model); fetch the network with `bash launch/fetch_fid_network.sh`.", flush=True)
  writer = metrics.create_writer(workdir, jsonl_name=None)
  report = metrics.progress(len(variants) * len(seeds), writer, every_secs=0, name="ablation")
  done = 0
  fp_cache: dict[int, np.ndarray] = {}
  for seed in seeds:
    base = variant_config(config, (), seed)
    fp_dir = workdir / "fp" / f"seed_{seed}"
    fp_dir.mkdir(parents=True, exist_ok=True)
    # The FP model first: its samples and its evaluation's features serve every row of this seed.
    fp_file = fp_dir / "samples.npz"
    fp_inputs = fp_row_inputs(base, fp_dir)
    fp_statistics = fp_dir / "eval" / "fp" / "statistics.npz"
    # The FP samples and features are computed again when missing (results copied to a new machine keep only
    # result.json): every row of the seed is compared with them.
    if (current_result(fp_dir, fp_inputs) is None or not fp_file.is_file()
        or (inception is not None and not fp_statistics.is_file())):
      models = Models(base, fp_dir)
      if reference is None and inception is not None:
        reference = reference_statistics(base, workdir, inception)
      if not fp_file.is_file():
        np.savez(fp_file, images=_sample_images(models, "fp", base))
      result = _score(models, "fp", base, fp_dir, np.load(fp_file)["images"], inception, reference)
      checkpoint.save_json(fp_dir / RESULT_FILE, {**result, stage_inputs.INPUTS_KEY: fp_inputs})
    fp_cache[seed] = np.load(fp_file)["images"]
    for name, scored, overrides in variants:
      variant_dir = workdir / slug(name) / f"seed_{seed}"
      variant = variant_config(config, overrides, seed)
      inputs = row_inputs(variant, variant_dir, scored)
      if current_result(variant_dir, inputs) is not None:
        done += 1
        report.report(done)
        continue
      variant_dir.mkdir(parents=True, exist_ok=True)
      start = time.time()
      models = Models(variant, variant_dir)
      if reference is None and inception is not None:
        reference = reference_statistics(variant, workdir, inception)
      calibration.load_or_calibrate(variant, variant_dir, bundle=models.bundle)
      if scored == "finetuned":
        finetune.finetune(variant, variant_dir)
      result = _score(models, scored, variant, variant_dir, fp_cache[seed], inception, reference, fp_statistics)
      result.update({"variant": name, "seed": seed, "scored": scored, "overrides": [list(o) for o in overrides],
                     "seconds": time.time() - start, stage_inputs.INPUTS_KEY: inputs})
      checkpoint.save_json(variant_dir / RESULT_FILE, result)
      logging.info("ablation %s seed %d: %s", name, seed, result)
      done += 1
      report.report(done)
  table = summarize(config, workdir, variants, seeds)
  return table


def summarize(config, workdir: pathlib.Path, variants, seeds) -> dict:
  rows = []
  metric_names = [metric for metric, _ in TABLE_COLUMNS] + ["x_prev_mse_vs_fp"]
  entries = [("FP (full precision)", workdir / "fp", "fp", ())] + [
      (name, workdir / slug(name), scored, overrides) for name, scored, overrides in variants]
  for name, directory, scored, overrides in entries:
    per_seed = []
    for seed in seeds:
      seed_dir = directory / f"seed_{seed}"
      if scored == "fp":
        inputs = fp_row_inputs(variant_config(config, (), seed), seed_dir)
      else:
        inputs = row_inputs(variant_config(config, overrides, seed), seed_dir, scored)
      result = _stored_if_current(seed_dir, inputs)
      if result is not None:
        per_seed.append(result)
    for result in per_seed:
      if "sample_mse_vs_fp" in result and scored != "fp":
        # From the stored MSE (results of msfp_jax before 2026-12-04 hold a mean of per-image PSNRs, +inf as soon
        # as one sample equals its FP sample).
        result["sample_psnr_vs_fp"] = paired.psnr_from_mse(result["sample_mse_vs_fp"])
    row = {"variant": name, "seeds": len(per_seed)}
    for metric in metric_names:
      values = [r[metric] for r in per_seed if metric in r]
      if values:
        row[metric] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1
                       else 0.0, "values": values}
    per_step = [r["per_step"] for r in per_seed if "per_step" in r]
    if per_step and all(r["t"] == per_step[0]["t"] for r in per_step):
      row["per_step"] = {"t": per_step[0]["t"], "gamma": per_step[0]["gamma"], **{
          key: np.mean([r[key] for r in per_step], axis=0).tolist() for key in ("eps_mse", "x_prev_mse")}}
    rows.append(row)
  curves = {row["variant"]: row["per_step"] for row in rows if "per_step" in row}
  if curves:
    first = next(iter(curves.values()))
    paired.plot_per_step_errors({"t": first["t"], **curves}, workdir / PER_STEP_PLOT,
                                title="teacher-forced error vs FP per sampler step, mean over seeds")
  q = config.quant
  has_fid = any("fid" in row for row in rows)
  header = (f"Ablation on {config.model.path} (W{q.weight_bits}A{q.act_bits} unless named), seeds {list(seeds)}, "
            f"{config.finetune.num_steps} fine-tuning steps, {config.sampler.kind.upper()} {config.sampler.num_steps} "
            + (f"steps, FID on {config.evaluation.num_samples} samples per row ({config.evaluation.fid_pipeline} "
               f"pipeline, against {config.evaluation.reference or 'the built-in model training digits'})"
               if has_fid else "steps, no FID (FID network not configured)")
            + ("; pixel FD against the held-out digits" if any("pixel_fd" in row for row in rows) else "")
            + f"; sample MSE and PSNR vs FP on {config.sample.num_images} samples and teacher-forced eps MSE on "
            f"{config.sample.num_teacher_forced} trajectories, from the FP model's noise; mean +- std (ddof 1) over "
            "the seeds each row has.")
  columns = [(metric, title) for metric, title in TABLE_COLUMNS if any(metric in row for row in rows)]
  lines = [header, "", "| variant | seeds | " + " | ".join(title for _, title in columns) + " |",
           "|---|---|" + "---|" * len(columns)]

  def cell(row, metric):
    if metric not in row:
      return "n/a"
    if len(row[metric]["values"]) == 1:
      return f"{row[metric]['mean']:.4g}"
    return f"{row[metric]['mean']:.4g} +- {row[metric]['std']:.2g}"
  for row in rows:
    lines.append(f"| {row['variant']} | {row['seeds']} | " + " | ".join(cell(row, m) for m, _ in columns) + " |")
  text = "\n".join(lines) + "\n"
  (workdir / "ablation.md").write_text(text)
  checkpoint.save_json(workdir / "ablation.json", {"header": header, "rows": rows})
  print(text, flush=True)
  return {"header": header, "rows": rows}
