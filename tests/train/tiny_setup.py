"""Shared by the fine-tuning tests and their subprocess worker: a tiny DDPM UNet (8x8 images) saved as a
converted model, and configs/default.py shrunk to it."""
import pathlib
import sys

import jax

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # configs/ is imported as a package from the repository root
  sys.path.insert(0, str(REPO_ROOT))

TINY_UNET = dict(resolution=8, in_channels=3, out_channels=3, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                 attn_resolutions=(4,), dropout=0.0, num_groups=4)


def write_tiny_model(dst) -> pathlib.Path:
  from msfp_jax import models
  model, _ = models.build_model("ddpm_unet", TINY_UNET)
  params = model.init(jax.random.key(0), *model.example_inputs(1))["params"]
  models.save_converted(dst, "ddpm_unet", TINY_UNET, params)
  return pathlib.Path(dst)


def tiny_config(model_dir, **overrides):
  """configs/default.py shrunk to the tiny model: 4 DDIM steps, K=2 banks of rank 2, batch 8."""
  from configs import default
  config = default.get_config()
  config.model.path = str(model_dir)
  config.sampler.num_steps = 4
  config.calibration.num_samples = 8
  config.calibration.batch_size = 8
  config.calibration.num_timesteps = 2
  config.lora.num_banks = 2
  config.lora.rank = 2
  config.lora.router_embed_dim = 8
  config.lora.router_hidden_dim = 8
  config.finetune.num_steps = 8
  config.finetune.batch_size = 8
  config.finetune.log_every = 1
  config.finetune.checkpoint_every = 4
  config.finetune.lr.lora = 1e-2
  config.finetune.lr.act_quant = 1e-3
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


