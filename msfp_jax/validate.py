"""validate_config: every check of a main-job config that needs no computation, run before anything is written.

The stages check their own fields too, but only when they start: a bad `finetune.dfa_weighting` used to surface
after a whole calibration, and a rejected config had already been recorded in the workdir. `validate_config`
builds every config object of the pipeline (quantization, schedule, sampler, TALoRA), checks the fine-tuning,
calibration, evaluation and sample fields, the batch sizes against the devices, and that the model exists, and
raises one ValueError naming every problem.
"""
from __future__ import annotations

from collections.abc import Callable

import jax

from msfp_jax import parallel
from msfp_jax.diffusion import losses
from msfp_jax.evaluation import preprocess
from msfp_jax.models.registry import MODEL_CONFIG_FILE
from msfp_jax.train import finetune, pipeline


class ConfigError(ValueError):
  """The config cannot run; the message names every field at fault."""


def validate_config(config) -> None:
  """Raises ConfigError naming every problem of `config` (a main-job config, e.g. configs/default.py)."""
  problems: list[str] = []

  def check(section: str, fn: Callable[[], object]) -> None:
    try:
      fn()
    except (ValueError, TypeError, KeyError, AttributeError) as e:
      problems.append(f"{section}: {str(e).rstrip('.')}")

  def at_least(field: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      problems.append(f"{field} must be an integer >= {minimum} (got {value!r})")

  check("quant", lambda: pipeline.quant_config_from(config))
  check("schedule", lambda: pipeline.schedule_from(config))
  check("sampler", lambda: pipeline.sampler_from(config))
  check("lora", lambda: pipeline.talora_config_from(config))
  check("finetune", lambda: finetune._check_finetune_config(config))  # pylint: disable=protected-access
  f = config.finetune
  if f.dfa_weighting not in losses.WEIGHTINGS:
    problems.append(f"finetune.dfa_weighting must be one of {losses.WEIGHTINGS} (got {f.dfa_weighting!r})")
  for name in ("num_samples", "batch_size", "num_timesteps"):
    at_least(f"calibration.{name}", config.calibration[name], 1)

  # The batches against the devices (fine-tuning shards its batch over the mesh; evaluation over local devices).
  def batch_fits_mesh():
    mesh = parallel.mesh_from_config(int(config.mesh.data))
    parallel.check_global_batch(int(f.batch_size), mesh)
  if isinstance(f.batch_size, int) and f.batch_size >= 1:
    check("finetune.batch_size", batch_fits_mesh)

  e = config.evaluation
  check("evaluation.fid_pipeline", lambda: preprocess.check_pipeline(e.fid_pipeline))
  at_least("evaluation.num_samples", e.num_samples, 2)
  at_least("evaluation.batch_size", e.batch_size, 2)
  num_local = jax.local_device_count()
  if isinstance(e.batch_size, int) and e.batch_size >= 2 and e.batch_size % num_local:
    problems.append(f"evaluation.batch_size ({e.batch_size}) must be a multiple of the number of local devices "
                    f"({num_local})")
  at_least("sample.num_images", config.sample.num_images, 1)

  def model_exists():
    directory = pipeline.model_dir(config.model.path)
    if not (directory / MODEL_CONFIG_FILE).is_file():
      raise ValueError(f"model.path {str(config.model.path)!r}: {directory} is not a converted msfp_jax model (no "
                       f"{MODEL_CONFIG_FILE}); convert a checkpoint with python -m msfp_jax.convert SRC DST")
  try:
    model_exists()
  except (ValueError, FileNotFoundError) as e_:
    problems.append(str(e_).rstrip("."))

  if problems:
    raise ConfigError("Invalid config, nothing was run or written: " + "; ".join(problems) + ".")
