"""`python -m msfp_jax.bench sample`: W4A4 DDIM sampling against FP sampling of the same model, side by side.

The model is the CIFAR-10 DDPM UNet (35.7M parameters, random weights: speed does not depend on the values)
unless --small is given (a ~1M-parameter UNet of the default model's size). Three samplers from the same
noise: FP; W4A4 PTQ (weights quantized once, activations rounded at call time); W4A4 TALoRA with K=4 banks
(each bank's merged kernels quantized once, the bank picked per step from the router's table).
Goal: W4A4 / FP <= 1.10x.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax import diffusion, lora, quant
from msfp_jax.bench.timing import median_seconds as _time
from msfp_jax.models import DDPMUNet, DDPMUNetConfig, preset
from msfp_jax.run.models import QuantizedSampler
from msfp_jax.train import pipeline


def run(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m msfp_jax.bench sample")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--small", action="store_true", help="a ~1M-parameter UNet instead of CIFAR-10's")
  parser.add_argument("--tiny", action="store_true", help="a few-thousand-parameter UNet (the script's own tests)")
  args = parser.parse_args(argv or [])
  if args.tiny:
    config = DDPMUNetConfig(resolution=8, in_channels=3, out_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                            attn_resolutions=(4,), dropout=0.0, num_groups=2)
  elif args.small:
    config = DDPMUNetConfig(resolution=16, in_channels=1, out_channels=1, ch=64, ch_mult=(1, 2), num_res_blocks=1,
                            attn_resolutions=(8,), dropout=0.0)
  else:
    config = preset("cifar10")
  model = DDPMUNet(config)
  x_example, t_example = model.example_inputs(args.batch)[:2]
  variables = jax.jit(model.init)(jax.random.key(0), x_example, t_example)
  num_params = sum(int(np.size(v)) for v in jax.tree.leaves(variables))
  rules = (quant.QuantRule(path=r"conv_in|temb_dense_\d+|conv_out", weight_bits=8, act_bits=8),)
  calib_x = jax.random.normal(jax.random.key(1), x_example.shape)
  calib_t = jnp.full((args.batch,), 500, jnp.int32)
  qstate = quant.calibrate(model, variables, [(calib_x, calib_t)], quant.QuantConfig(rules=rules))
  bundle = pipeline.ModelBundle(model=model, variables=variables, meta={}, sample_shape=tuple(x_example.shape[1:]),
                                num_classes=0, null_label=-1, guidance_scale=1.0)
  schedule = diffusion.make_schedule("linear", 1000)
  sampler_config = diffusion.SamplerConfig(kind="ddim", num_steps=args.steps, eta=0.0)
  x_T = np.asarray(jax.random.normal(jax.random.key(2), x_example.shape))

  ptq = QuantizedSampler(bundle, qstate)
  talora_config = lora.TALoRAConfig(num_banks=4, rank=8, scale=1.0,
                                    router=lora.RouterConfig(num_banks=4, num_timesteps=1000))
  layers = quant.discover_layers(model, variables, x_example, t_example, config=quant.QuantConfig(rules=rules))
  talora_params = lora.init_talora(jax.random.key(3), layers, talora_config)
  talora = QuantizedSampler(bundle, qstate, talora_params, talora_config)
  fp_apply = lambda x, t: model.apply(variables, x, t)  # noqa: E731

  def sampler(apply):
    return lambda: jax.block_until_ready(diffusion.sample(apply, x_T, schedule, sampler_config))

  seconds = {"fp": _time(sampler(fp_apply), args.repeats),
             "w4a4_ptq": _time(sampler(ptq.apply), args.repeats),
             "w4a4_talora_k4": _time(sampler(talora.apply), args.repeats)}
  result = {
      "model": "DDPM UNet " + ("tiny" if args.tiny else "small" if args.small else "CIFAR-10 configuration"),
      "parameters": num_params,
      "batch": args.batch, "ddim_steps": args.steps,
      "fp_seconds_per_step": seconds["fp"] / args.steps,
      "w4a4_ptq_seconds_per_step": seconds["w4a4_ptq"] / args.steps,
      "w4a4_talora_k4_seconds_per_step": seconds["w4a4_talora_k4"] / args.steps,
      "ratio_w4a4_ptq_vs_fp": seconds["w4a4_ptq"] / seconds["fp"],
      "ratio_w4a4_talora_k4_vs_fp": seconds["w4a4_talora_k4"] / seconds["fp"],
  }
  for key, value in result.items():
    print(f"{key:36s} {value:.4g}" if isinstance(value, float) else f"{key:36s} {value}")
  return result
