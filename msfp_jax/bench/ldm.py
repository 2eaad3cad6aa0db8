"""`python -m msfp_jax.bench ldm`: one guided DDIM step of the LDM-4 ImageNet UNet, Flax vs diffusers/PyTorch.

Both sides build the cin256-v2 UNet configuration (msfp_jax.models.ldm_presets, ~400M parameters; diffusers'
UNet2DConditionModel of the same configuration) with random weights (each its own: only time is compared),
at --batch images (default 4) of 64x64x3 latents. One guided step runs the conditional and the
unconditional rows batched together (2 x batch UNet rows), combines eps_u + s (eps_c - eps_u) and applies
the DDIM (eta 0) update; the Flax step uses msfp_jax.diffusion's guided_eps_fn and gamma_t coefficients,
jitted with the parameters as arguments. Each side is warmed up (and compiled), then timed over --repeats
runs (median). The model is heavy on a CPU: keep repeats small.
Goal: Flax at least as fast (ratio torch/flax >= 1). Needs torch and diffusers (test dependencies).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax import diffusion
from msfp_jax.bench.timing import median_seconds as _median_seconds
from msfp_jax.models.ldm_presets import PRESETS
from msfp_jax.models.ldm_unet import LDMUNet, count_params, init_shapes


def _random_params(shapes, seed: int):
  """Random parameters in numpy (no compilation; jitted init of 400M parameters is slow on CPU)."""
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return (rng.standard_normal(leaf.shape, np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)
    if name == "scale":
      return np.ones(leaf.shape, np.float32)
    if name == "embedding":
      return rng.standard_normal(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)
  return jax.tree_util.tree_map_with_path(make, shapes)


def run(argv: list[str] | None = None) -> dict:
  """Runs the benchmark, prints a table and returns the numbers."""
  parser = argparse.ArgumentParser(prog="python -m msfp_jax.bench ldm", description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=4, help="images per guided step (UNet rows: 2x)")
  parser.add_argument("--latent-size", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
  parser.add_argument("--guidance-scale", type=float, default=3.0)
  parser.add_argument("--tiny", action="store_true",
                      help="the cin256-v2 structure at 32/64 channels on 8x8 latents (the script's own test)")
  args = parser.parse_args(argv or [])

  # pylint: disable=g-import-not-at-top  (torch and diffusers: test dependencies, the reference side only)
  import torch
  from diffusers import UNet2DConditionModel
  # pylint: enable=g-import-not-at-top

  preset = PRESETS["cin256-v2"]
  cfg = preset.unet
  batch, size, scale = args.batch, args.latent_size, args.guidance_scale
  if args.tiny:
    cfg = dataclasses.replace(cfg, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                              attention_resolutions=(1, 2), num_heads=2, context_dim=16)
    size = 8
  null = preset.null_class

  # DDIM step t=951 -> t=901 of a 20-step run (the ImageNet protocol), coefficients from msfp_jax.diffusion.
  schedule = diffusion.make_schedule(**{k: v for k, v in preset.schedule.items()})
  sampler_config = diffusion.SamplerConfig(kind="ddim", num_steps=20, eta=0.0, skip="ldm_uniform")
  ts = diffusion.sampling_timesteps(schedule, sampler_config)
  gammas = diffusion.noise_coefficients(schedule, sampler_config)
  t_now, t_prev, gamma = int(ts[0]), int(ts[1]), float(gammas[0])
  abar = schedule.alphas_cumprod
  c_x = float(np.sqrt(abar[t_prev] / abar[t_now]))

  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, preset.num_classes, batch).astype(np.int32)

  # ---- Flax
  model = LDMUNet(cfg)
  shapes = init_shapes(cfg)["params"]
  variables = {"params": jax.tree.map(jnp.asarray, _random_params(shapes, 0))}
  num_params = count_params(shapes)

  @jax.jit
  def flax_step(variables, x, t, y):
    eps_fn = diffusion.guided_eps_fn(lambda a, b, c: model.apply(variables, a, b, c), y, null, scale)
    return c_x * x + gamma * eps_fn(x, t)

  x_jax, t_jax, y_jax = jnp.asarray(x), jnp.full((batch,), t_now, jnp.int32), jnp.asarray(labels)
  start = time.perf_counter()
  jax.block_until_ready(flax_step(variables, x_jax, t_jax, y_jax))
  flax_first = time.perf_counter() - start
  flax_s = _median_seconds(lambda: jax.block_until_ready(flax_step(variables, x_jax, t_jax, y_jax)), args.repeats)

  # ---- PyTorch (diffusers), same configuration
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  channels = tuple(cfg.model_channels * m for m in cfg.channel_mult)
  attn = [2 ** i in cfg.attention_resolutions for i in range(len(channels))]
  torch_model = UNet2DConditionModel(
      sample_size=size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
      down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
      up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]),
      block_out_channels=channels, layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
      attention_head_dim=cfg.num_heads).eval()
  table = torch.randn(cfg.context_classes, cfg.context_dim)
  x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  y_t = torch.from_numpy(labels).long()

  def torch_step():
    with torch.inference_mode():
      both_y = torch.cat([y_t, torch.full_like(y_t, null)])
      eps = torch_model(torch.cat([x_t, x_t]), torch.full((2 * batch,), t_now),
                        encoder_hidden_states=table[both_y][:, None, :]).sample
      eps_c, eps_u = eps[:batch], eps[batch:]
      return c_x * x_t + gamma * (eps_u + scale * (eps_c - eps_u))

  torch_s = _median_seconds(torch_step, args.repeats)
  torch_params = sum(p.numel() for p in torch_model.parameters())

  result = {
      "model": f"LDM-4 ImageNet (cin256-v2{', tiny' if args.tiny else ''}) UNet, random weights",
      "flax_parameters": num_params,
      "torch_parameters_unet_only": torch_params, "images_per_step": batch, "unet_rows": 2 * batch,
      "latent": f"{size}x{size}x3", "jax_backend": jax.default_backend(), "torch_threads": args.threads,
      "repeats": args.repeats, "flax_first_call_seconds_incl_compile": flax_first,
      "flax_step_seconds": flax_s, "torch_step_seconds": torch_s, "ratio_torch_vs_flax": torch_s / flax_s,
  }
  for key, value in result.items():
    print(f"{key:38s} {value:.4g}" if isinstance(value, float) else f"{key:38s} {value}")
  return result


if __name__ == "__main__":
  run()
