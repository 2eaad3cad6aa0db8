"""The export stage: the fine-tuned model as packed 4-bit codes, checked against the fake-quantized model.

Writes export/model_packed.npz (two codes per byte, per-channel maxvals, zero points, format ids, one weight set
per TALoRA bank, the router's bank per timestep) and export/summary.json (sizes against the FP checkpoint, and
how far sampling from the file is from the fake-quantized model: exactly, and run on codes).
"""
from __future__ import annotations

import pathlib

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax import checkpoint, diffusion, lora, quant, stage_inputs
from msfp_jax.quant import packed
from msfp_jax.run.models import Models, sampler_eps
from msfp_jax.train import finetune, pipeline

EXPORT_DIR = "export"
EXPORT_FILE = "export/model_packed.npz"
EXPORT_SUMMARY = "export/summary.json"
# The shift of the starting noise whose effect on the fake-quantized samples the code-domain check is read against.
NOISE_NUDGE = 1e-6


def _stored(config, workdir: pathlib.Path) -> tuple[dict, dict, dict[str, list[str]]]:
  """(the stored summary, the export's inputs now, {"export": why} when it is still to compute, else {})."""
  summary_path = workdir / EXPORT_SUMMARY
  previous = checkpoint.load_json(summary_path) if summary_path.is_file() else {}
  current = stage_inputs.export_inputs(config, workdir)
  stored = {"export": previous.get(stage_inputs.INPUTS_KEY)} if previous else {}
  return previous, current, stage_inputs.pending({"export": current}, stored)


def is_done(config, workdir) -> bool:
  return not _stored(config, pathlib.Path(workdir))[2]


def _directory_bytes(directory: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def run_export(config, workdir, models: Models | None = None) -> dict:
  """Writes the fine-tuned model as packed codes (one weight set per TALoRA bank), checks that it samples exactly
  what the fake-quantized model samples, and returns the summary. (msfp_jax.run.job skips the stage when its
  result is current.)"""
  workdir = pathlib.Path(workdir)
  _, inputs, todo = _stored(config, workdir)
  stage_inputs.announce("export", todo.get("export", []))
  models = models or Models(config, workdir)
  bundle = models.bundle
  result = finetune.load_finetuned(config, workdir)
  talora_config = result.talora_config
  merged = [merge_bank(bundle.variables, result.params, talora_config, k) for k in range(talora_config.num_banks)]
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
  x_T, labels, rng = models.fixed_noise(stage_inputs.export_check_images(config))
  from_packed = models.decode(
      sample_from_packed(loaded, bundle, models.schedule, models.sampler_config, x_T, labels, rng))
  fake_quant = models.sample("finetuned", x_T, labels, rng)
  max_diff = float(np.max(np.abs(from_packed - fake_quant)))
  # As an integer kernel would run it: equal up to float summation order while every zero point is on the
  # grid (calibration puts it there; training the activation ranges, finetune.lr.act_quant > 0, moves it).
  on_codes = models.decode(sample_from_packed(loaded, bundle, models.schedule, models.sampler_config, x_T, labels,
                                              rng, code_domain=True))
  code_domain_diff = float(np.max(np.abs(on_codes - fake_quant)))
  # What such a difference is to be read against: a 4-bit model's own samples move when an activation crosses a
  # rounding boundary, which a float-rounding-sized change can make it do, and 50 sampler steps amplify it (on the
  # CIFAR-10 model a 1e-6 shift of the input moves a single eps prediction by 0.01 on average).
  nudged = models.sample("finetuned", x_T + np.float32(NOISE_NUDGE), labels, rng)
  nudged_diff = float(np.max(np.abs(nudged - fake_quant)))
  summary = {
      "file": str(path), "num_banks": talora_config.num_banks, "bytes": sizes["file"],
      "bytes_one_bank": one_bank["file"], "fp_checkpoint_bytes": fp_bytes,
      "float32_equivalent_bytes": sizes["float32_equivalent"],
      "ratio_one_bank_vs_fp": one_bank["file"] / fp_bytes,
      "ratio_all_banks_vs_fp": sizes["file"] / fp_bytes,
      "max_abs_diff_packed_vs_fake_quant_samples": max_diff,
      "max_abs_diff_code_domain_vs_fake_quant_samples": code_domain_diff,
      "max_abs_diff_fake_quant_nudged_noise_samples": nudged_diff, "noise_nudge": NOISE_NUDGE,
      stage_inputs.INPUTS_KEY: inputs,
  }
  checkpoint.save_json(workdir / EXPORT_SUMMARY, summary)
  return summary


def merge_bank(variables, talora_params, talora_config: lora.TALoRAConfig, bank: int):
  """variables whose LoRA-carrying kernels are the float W + B_k A_k of bank `bank` (before quantization)."""
  update = lora.make_kernel_update(talora_params, talora_config, bank=bank)
  flat = flax.traverse_util.flatten_dict(variables["params"], sep="/")
  for path in lora.flat_banks(talora_params["banks"]):
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
  eps_fn = sampler_eps(apply, bundle, labels)
  return np.asarray(diffusion.sample(eps_fn, x_T, schedule, sampler_config, rng))
