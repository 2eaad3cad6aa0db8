"""What each stage result was computed from, so that a result whose inputs changed is computed again.

The sample, eval and export stages store beside each result its *inputs*: a flat dict of the hashes of the files
it read (the FP model, the calibration, the fine-tuned checkpoint and its step, the FID network, the reference
statistics) and of the config fields it read. A stored result is reused only when its inputs equal the current
ones; otherwise the stage prints which inputs changed and computes it again. The report shows only results whose
inputs are current, so it never prints a protocol beside scores computed under another one.

Samples and scores are kept per model (fp, ptq, finetuned): extending fine-tuning recomputes the fine-tuned
model's results and keeps the others.
"""
from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Mapping
from typing import Any

from msfp_jax import checkpoint, cli, config_record
from msfp_jax.train import calibration, finetune, pipeline

INPUTS_KEY = "inputs"      # where a summary stores its inputs
INPUTS_FILE = "inputs.json"  # beside a result folder's partial work (the eval rounds)

# Config fields (dotted; a trailing "." is a prefix) that the samples of every model depend on.
SAMPLING_FIELDS = ("seed", "model.", "schedule.", "sampler.")
QUANTIZED_FIELDS = ("quant.",)      # the calibration's own fields are covered by its hash
FINETUNED_FIELDS = ("lora.",)
SAMPLE_FIELDS = ("sample.",)
EVAL_FIELDS = ("evaluation.",)
# File paths among EVAL_FIELDS: the files' contents are recorded instead of the path text.
EVAL_PATH_FIELDS = ("evaluation.inception", "evaluation.reference")
EXPORT_CHECK_IMAGES = 8  # at most, of sample.num_images

_HASHES: dict[tuple, str] = {}


def normalized(value: Any) -> Any:
  """`value` as it comes back from JSON (tuples as lists), so stored and current inputs compare equal."""
  return config_record.json_normalized(value)


def tree_sha256(path) -> str | None:
  """sha256 of a file, or of a folder's relative file names and contents; None when absent. A folder's Markdown
  files (a model card) are left out: editing the documentation changes no result. Cached per process while no
  file's size or mtime changes (the FP model is hashed once per run, not once per stage)."""
  path = pathlib.Path(path)
  if path.is_file():
    files = [path]
  elif path.is_dir():
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix != ".md")
  else:
    return None
  key = (str(path.resolve()), path.is_file(), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
  if key not in _HASHES:
    if path.is_file():
      _HASHES[key] = checkpoint.file_sha256(path)
    else:
      digest = hashlib.sha256()
      for p in files:
        digest.update(str(p.relative_to(path)).encode())
        digest.update(checkpoint.file_sha256(p).encode())
      _HASHES[key] = digest.hexdigest()
  return _HASHES[key]


def config_fields(config, fields: tuple[str, ...], exclude: tuple[str, ...] = ()) -> dict[str, Any]:
  """The config's values of `fields` (dotted names; "x." selects every field under x), flattened."""
  flat = config_record.flatten(config_record.json_config(config))
  return {k: v for k, v in flat.items() if k not in exclude and any(
      k.startswith(f) if f.endswith(".") else k == f for f in fields)}


def finetuned_checkpoint(workdir) -> dict[str, Any]:
  """The step and hash of the fine-tuned checkpoint the later stages load (the latest)."""
  directory = pathlib.Path(workdir) / finetune.CHECKPOINT_DIR
  step = None
  if directory.is_dir():
    manager = checkpoint.CheckpointManager(directory)
    step = manager.latest_step()
    manager.close()
  return {"finetune_step": step,
          "finetune_checkpoint_sha256": None if step is None else tree_sha256(directory / str(step))}


def model_inputs(config, workdir, name: str) -> dict[str, Any]:
  """What the samples of model `name` ("fp", "ptq", "finetuned") are computed from."""
  workdir = pathlib.Path(workdir)
  inputs = {"fp_model_sha256": tree_sha256(pipeline.model_dir(config.model.path)),
            **config_fields(config, SAMPLING_FIELDS)}
  if name != "fp":
    inputs["calibration_sha256"] = tree_sha256(workdir / calibration.CALIBRATION_DIR)
    inputs.update(config_fields(config, QUANTIZED_FIELDS))
  if name == "finetuned":
    inputs.update(finetuned_checkpoint(workdir))
    inputs.update(config_fields(config, FINETUNED_FIELDS))
  return normalized(inputs)


def sample_inputs(config, workdir, name: str) -> dict[str, Any]:
  return normalized({**model_inputs(config, workdir, name), **config_fields(config, SAMPLE_FIELDS)})


def inception_path(config) -> pathlib.Path | None:
  """config.evaluation.inception; a relative path missing from the working directory is taken relative to the
  repository (the configs' default .cache/fid/... is where launch/fetch_fid_network.sh puts the network)."""
  path = str(config.evaluation.inception or "")
  return cli.resolve_repo_path(path) if path else None


def eval_inputs(config, workdir, name: str) -> dict[str, Any]:
  inception = inception_path(config)
  reference = str(config.evaluation.reference or "")
  reference_file = pathlib.Path(reference).expanduser() if reference else None
  return normalized({
      **model_inputs(config, workdir, name), **config_fields(config, EVAL_FIELDS, exclude=EVAL_PATH_FIELDS),
      "inception_sha256": tree_sha256(inception) if inception is not None else None,
      # A statistics/images file by its contents; a folder or tfds:NAME by its name.
      "reference": (tree_sha256(reference_file) if reference_file is not None and reference_file.is_file()
                    else reference)})


def export_check_images(config) -> int:
  """How many samples of the fake-quantized model the export checks its file against."""
  return min(EXPORT_CHECK_IMAGES, int(config.sample.num_images))


def export_inputs(config, workdir) -> dict[str, Any]:
  return normalized({**model_inputs(config, workdir, "finetuned"), "check_images": export_check_images(config)})


def _short(value: Any) -> str:
  text = repr(value)
  return text[:14] + "..." if isinstance(value, str) and len(value) == 64 else text


def changes(recorded: Any, current: dict[str, Any]) -> list[str]:
  """The inputs that differ between a stored result and now ("name old -> new"); [] when it is current."""
  if not isinstance(recorded, dict):
    return ["no inputs recorded (a result of an older msfp_jax)"]
  current = normalized(current)
  missing = "<absent>"
  return [f"{k} {_short(recorded.get(k, missing))} -> {_short(current.get(k, missing))}"
          for k in sorted(set(recorded) | set(current)) if recorded.get(k, missing) != current.get(k, missing)]


def pending(current: Mapping[str, dict[str, Any]], recorded: Mapping[str, Any]) -> dict[str, list[str]]:
  """The results still to compute, of those named in `current` (name -> its inputs now): a name without a stored
  result (absent from `recorded`, name -> the inputs stored with its result) maps to [], one whose result was
  computed from other inputs to the inputs that changed."""
  todo = {}
  for name, inputs in current.items():
    changed = changes(recorded[name], inputs) if name in recorded else []
    if name not in recorded or changed:
      todo[name] = changed
  return todo


def announce(what: str, changed: list[str]) -> None:
  """Says that a stored result of `what` is computed again, and why (nothing for a result computed first)."""
  if changed:
    print(f"{what}: computing again, its inputs changed: {'; '.join(changed)}", flush=True)
