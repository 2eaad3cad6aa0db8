"""Defaults of the latent-diffusion family (CompVis LDM: LSUN Bedroom, LSUN Church, ImageNet), method.md 3, 5-8.

The UNet runs in latent space; the autoencoder (first stage) and the class embedding stay in full precision.
Experiment files import this and override what differs.
"""
from __future__ import annotations

import ml_collections

from msfp_jax.configs import ddpm_defaults

# openaimodel layout: the input conv, the time-embedding MLP and the output conv stay at 8 bits.
LDM_HIGH_PRECISION_PATHS = r"input_blocks_0_0|time_embed_\d+|out_\d+"


def get_config() -> ml_collections.ConfigDict:
  config = ddpm_defaults.get_config()
  # LDM's "linear" schedule is linear in sqrt(beta) (diffusion's "scaled_linear").
  config.schedule.kind = "scaled_linear"
  config.schedule.num_timesteps = 1000
  config.schedule.beta_start = 0.0015
  config.schedule.beta_end = 0.0195
  config.quant.high_precision_paths = LDM_HIGH_PRECISION_PATHS
  config.calibration.num_samples = 128
  config.calibration.batch_size = 16
  config.lora.rank = 32
  config.finetune.batch_size = 2
  config.finetune.num_steps = 16000  # EfficientDM on ImageNet: 160 trajectories x 100 steps, 2 samples each
  config.evaluation.batch_size = 100
  return config
