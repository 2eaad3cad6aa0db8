"""Shared by the fine-tuning tests and their subprocess worker: a tiny DDPM UNet (8x8 images) saved as a
converted model, and configs/default.py shrunk to it."""
import pathlib

import jax

from msfp_jax import models
from msfp_jax.configs import default

TINY_UNET = dict(resolution=8, in_channels=3, out_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(4,), dropout=0.0, num_groups=4)


def write_tiny_model(dst) -> pathlib.Path:
  model, _ = models.build_model("ddpm_unet", TINY_UNET)
  params = model.init(jax.random.key(0), *model.example_inputs(1))["params"]
  models.save_converted(dst, "ddpm_unet", TINY_UNET, params)
  return pathlib.Path(dst)


# The tiny end-to-end budget: the one definition of it, used in-process (`tiny_config`) and on the command line
# (`tiny_flags`) by every test that runs the main job or one of its stages on the tiny model.
TINY_OVERRIDES = {
    "sampler.num_steps": 4,
    "calibration.num_samples": 8,
    "calibration.batch_size": 8,
    "calibration.num_timesteps": 2,
    "lora.num_banks": 2,
    "lora.rank": 2,
    "lora.router_embed_dim": 8,
    "lora.router_hidden_dim": 8,
    "finetune.num_steps": 8,
    "finetune.batch_size": 8,
    "finetune.log_every": 1,
    "finetune.checkpoint_every": 4,
    "sample.num_images": 4,
    "evaluation.num_samples": 4,  # one evaluation round of 4 images per model
    "evaluation.batch_size": 4,
}

# The in-process fine-tuning tests train at rates that move the loss within 8 steps. The command-line tests keep
# the config's own rates: the packed export's code-domain check relies on zero points that barely move.
TINY_LEARNING_RATES = {"finetune.lr.lora": 1e-2, "finetune.lr.act_quant": 1e-3}


def tiny_config(model_dir, **overrides):
  """configs/default.py shrunk to the tiny model (TINY_OVERRIDES, TINY_LEARNING_RATES), then `overrides`."""
  config = default.get_config()
  config.model.path = str(model_dir)
  for key, value in {**TINY_OVERRIDES, **TINY_LEARNING_RATES, **overrides}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def tiny_flags(**overrides) -> list[str]:
  """TINY_OVERRIDES, then `overrides`, as `--config.a.b=value` flags of the main job's command line."""
  return [f"--config.{key}={value}" for key, value in {**TINY_OVERRIDES, **overrides}.items()]
