"""`python -m msfp_jax.bench unet`: the converted Flax DDPM UNet against diffusers' UNet2DModel in PyTorch.

Both run the CIFAR-10 configuration (35.7M parameters) with the same random weights (the diffusers model's,
converted by msfp_jax.models.convert) on the same inputs: forward pass at --batch (default 16), each warmed
up, median of --repeats runs; PyTorch uses torch.set_num_threads(--threads, default: all cores). Then the
time per step of the jitted DDIM sampler (msfp_jax.diffusion.sample) on the Flax model.
Goal: Flax forward at least as fast as PyTorch's (ratio torch/flax >= 1).
Needs torch and diffusers (test dependencies).
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax import diffusion
from msfp_jax.bench.timing import median_seconds as _median_seconds
from msfp_jax.models.convert.diffusers_unet import convert_diffusers_state_dict, diffusers_config_to_ddpm
from msfp_jax.models.unet import DDPMUNet

# google/ddpm-cifar10-32's UNet2DModel configuration (docs/checkpoints.md).
CIFAR10_DIFFUSERS_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, time_embedding_type="positional", freq_shift=1,
    flip_sin_to_cos=False, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), block_out_channels=(128, 256, 256, 256),
    layers_per_block=2, mid_block_scale_factor=1, downsample_padding=0, act_fn="silu", attention_head_dim=None,
    norm_num_groups=32, norm_eps=1e-6, resnet_time_scale_shift="default", add_attention=True, dropout=0.1)
# --tiny: the same structure at 8x8 with 16/32 channels, for the benchmarks' smoke test (tests/bench).
TINY_DIFFUSERS_CONFIG = dict(
    CIFAR10_DIFFUSERS_CONFIG, sample_size=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), block_out_channels=(16, 32), layers_per_block=1,
    norm_num_groups=8)



def run(argv: list[str] | None = None) -> dict:
  """Runs the benchmark, prints a table and returns the numbers."""
  parser = argparse.ArgumentParser(prog="python -m msfp_jax.bench unet", description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
  parser.add_argument("--ddim-steps", type=int, default=5, help="DDIM steps timed (0: skip the sampler)")
  parser.add_argument("--tiny", action="store_true", help="an 8x8 UNet of 16/32 channels (the script's own test)")
  args = parser.parse_args(argv or [])

  # pylint: disable=g-import-not-at-top  (torch and diffusers: test dependencies, the reference side only)
  import torch
  from diffusers import UNet2DModel
  # pylint: enable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  diffusers_config = TINY_DIFFUSERS_CONFIG if args.tiny else CIFAR10_DIFFUSERS_CONFIG
  torch_model = UNet2DModel(**diffusers_config).eval()
  config = diffusers_config_to_ddpm({"_class_name": "UNet2DModel", **diffusers_config})
  state_dict = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
  params = convert_diffusers_state_dict(state_dict, config)
  model = DDPMUNet(config=config)
  variables = {"params": jax.tree.map(jnp.asarray, params)}
  num_params = sum(int(np.size(v)) for v in jax.tree.leaves(params))

  rng = np.random.default_rng(0)
  size = diffusers_config["sample_size"]
  x = rng.standard_normal((args.batch, size, size, 3)).astype(np.float32)
  t = rng.integers(0, 1000, size=args.batch).astype(np.int32)
  x_torch = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  t_torch = torch.from_numpy(t).long()
  x_jax, t_jax = jnp.asarray(x), jnp.asarray(t)

  def torch_forward():
    with torch.inference_mode():
      return torch_model(x_torch, t_torch).sample

  apply = jax.jit(model.apply)

  def flax_forward():
    return jax.block_until_ready(apply(variables, x_jax, t_jax))

  torch_s = _median_seconds(torch_forward, args.repeats)
  flax_s = _median_seconds(flax_forward, args.repeats)
  out_torch = torch_forward().numpy().transpose(0, 2, 3, 1)
  out_flax = np.asarray(flax_forward())
  rel_err = float(np.linalg.norm(out_flax - out_torch) / np.linalg.norm(out_torch))

  result = {
      "model": f"DDPM UNet, {'tiny' if args.tiny else 'CIFAR-10'} configuration", "parameters": num_params,
      "batch": args.batch,
      "torch_threads": args.threads, "jax_backend": jax.default_backend(),
      "torch_forward_seconds": torch_s, "flax_forward_seconds": flax_s,
      "ratio_torch_vs_flax": torch_s / flax_s, "relative_difference": rel_err,
  }
  if args.ddim_steps > 0:
    schedule = diffusion.make_schedule("linear", 1000)
    sampler_config = diffusion.SamplerConfig(kind="ddim", num_steps=args.ddim_steps, eta=0.0)
    eps_fn = lambda xt, tt: model.apply(variables, xt, tt)  # noqa: E731
    sample_s = _median_seconds(
        lambda: jax.block_until_ready(diffusion.sample(eps_fn, x_jax, schedule, sampler_config)),
        max(1, args.repeats // 2))
    result.update({"ddim_steps": args.ddim_steps, "ddim_seconds_per_step": sample_s / args.ddim_steps,
                   "ratio_ddim_step_vs_forward": sample_s / args.ddim_steps / flax_s})

  for key, value in result.items():
    print(f"{key:30s} {value:.4g}" if isinstance(value, float) else f"{key:30s} {value}")
  return result


if __name__ == "__main__":
  run()
