"""`python -m msfp_jax.bench quant`: jitted W4A4 fake-quantized forward vs FP forward of a UNet.

The model is the DDPM CIFAR-10 UNet (35.7M parameters, 32x32 inputs) with random weights; calibration uses
random inputs (the timing does not depend on the data). Weights are prequantized once
(prequantize_weights), so the quantized forward only adds the activation rounding at every Conv/Dense
input. Both forwards are timed in the same run, interleaved, and the ratio of medians is reported.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax.models.unet import DDPMUNet, DDPMUNetConfig, preset
from msfp_jax.quant import QuantConfig, calibrate, prequantize_weights, quantized_apply

# --tiny: an 8x8 UNet of a few thousand parameters, for the benchmarks' smoke test (tests/bench).
TINY_UNET = DDPMUNetConfig(resolution=8, in_channels=3, out_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(4,), dropout=0.0, num_groups=2)


def _parse(argv):
  parser = argparse.ArgumentParser(prog="python -m msfp_jax.bench quant", description=__doc__)
  parser.add_argument("--batch", type=int, default=8, help="forward batch size")
  parser.add_argument("--repeats", type=int, default=10, help="timed forwards per variant")
  parser.add_argument("--calibration_batches", type=int, default=2, help="random calibration batches")
  parser.add_argument("--bits", type=int, default=4, help="weight and activation bits")
  parser.add_argument("--tiny", action="store_true", help="a few-thousand-parameter UNet (the script's own test)")
  return parser.parse_args(argv)


def _time(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def run(argv: list[str] | None = None) -> dict:
  """Runs the benchmark; prints a table and returns the numbers (seconds and the ratio)."""
  args = _parse(argv or [])
  config = TINY_UNET if args.tiny else preset("cifar10")
  model = DDPMUNet(config=config)
  rng = jax.random.key(0)
  size = config.resolution
  x = jax.random.normal(rng, (args.batch, size, size, config.in_channels))
  t = jax.random.randint(jax.random.key(1), (args.batch,), 0, 1000)
  variables = jax.jit(model.init)(jax.random.key(2), x, t)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))

  start = time.perf_counter()
  batches = [(jax.random.normal(jax.random.key(10 + i), x.shape),
              jax.random.randint(jax.random.key(20 + i), t.shape, 0, 1000)) for i in range(args.calibration_batches)]
  qstate = calibrate(model, variables, batches, QuantConfig(weight_bits=args.bits, act_bits=args.bits))
  calibrate_s = time.perf_counter() - start
  prequantized = jax.jit(prequantize_weights)(variables, qstate)

  fp_forward = jax.jit(model.apply)
  q_forward = jax.jit(lambda v, s, x, t: quantized_apply(model, v, s, x, t, weights_prequantized=True))
  fp_args, q_args = (variables, x, t), (prequantized, qstate, x, t)
  compile_fp = _time(fp_forward, *fp_args)
  compile_q = _time(q_forward, *q_args)
  fp_times, q_times = [], []
  for _ in range(args.repeats):  # interleaved, so that load changes on the machine hit both alike
    fp_times.append(_time(fp_forward, *fp_args))
    q_times.append(_time(q_forward, *q_args))
  fp_s, q_s = statistics.median(fp_times), statistics.median(q_times)
  error = float(jnp.sqrt(jnp.mean((q_forward(*q_args) - fp_forward(*fp_args)) ** 2)))
  result = {
      "model": f"DDPM UNet {'tiny' if args.tiny else 'CIFAR-10'} ({num_params / 1e6:.1f}M params), batch "
               f"{args.batch}, {size}x{size}",
      "quantized_layers": len(qstate.layers),
      "fp_forward_s": fp_s,
      f"w{args.bits}a{args.bits}_forward_s": q_s,
      "ratio": q_s / fp_s,
      "fp_first_call_s": compile_fp,
      "quantized_first_call_s": compile_q,
      "calibrate_s": calibrate_s,
      "output_rms_difference": error,
  }
  width = max(len(k) for k in result)
  for key, value in result.items():
    print(f"{key.ljust(width)}  {value:.4g}" if isinstance(value, float) else f"{key.ljust(width)}  {value}")
  return result


if __name__ == "__main__":
  run()
