"""`python -m msfp_jax.bench device`: the one prepared script for a session that has an accelerator.

  python -m msfp_jax.bench device [--tiny] [--out results.json]

On whatever `jax.devices()[0]` is (GPU, TPU, or the CPU in tests with --tiny), in about 10 minutes on a GPU:

1. Fake quantization is not the identity under jit on this device. XLA may remove a pair of casts through a
   low-precision dtype on GPU, so a quantizer that rounds by casting would silently pass values through. We
   check (a) a jitted fake_quant of random values against the grid computed in numpy float64 (every output
   a grid value, the nearest one), (b) the number of distinct values in a 4-bit quantized tensor (<= 16),
   and (c) a calibrated W4A4 UNet's jitted output differs from the FP output by a clearly non-zero amount.
2. FP against W4A4 DDIM sampling (PTQ and TALoRA K=4), side by side (`bench sample`).
3. The TALoRA + W4A4 + DFA fine-tune step against an FP forward+backward (`bench finetune`).
4. Inception pool3 throughput, Flax against torch.jit when torch is installed (`bench inception`).

A failed check (1) raises: timing a quantizer that does not quantize would be meaningless.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax import quant
from msfp_jax.bench import finetune, inception, sample
from msfp_jax.models import DDPMUNet, DDPMUNetConfig


def check_fake_quant_not_identity(tiny: bool) -> dict:
  """Check 1 (see the module docstring); raises AssertionError when the device does not quantize."""
  fmt = quant.FPFormat.from_name("E2M1")
  x = np.random.RandomState(0).normal(size=(4096,)).astype(np.float32) * 2
  maxval = np.float32(6.0)
  out = np.asarray(jax.jit(lambda v: quant.fake_quant(v, fmt, maxval))(jnp.asarray(x)))
  grid = np.asarray(fmt.grid(float(maxval)), np.float64)
  nearest = grid[np.argmin(np.abs(np.clip(x, grid.min(), grid.max())[:, None].astype(np.float64) - grid[None]),
                           axis=1)]
  on_grid = np.isin(out.astype(np.float64), grid)
  ties = np.isclose(np.abs(x[:, None] - grid[None]), np.abs(x[:, None] - grid[None]).min(1, keepdims=True)).sum(1) > 1
  matches = (out == nearest) | ties  # round-half-to-even may pick the other neighbour of an exact tie
  distinct = int(np.unique(out).size)
  if not on_grid.all() or not matches.all() or distinct > fmt.num_codes:
    raise AssertionError(f"fake_quant under jit on {jax.devices()[0]} does not round to the E2M1 grid: "
                         f"{int((~on_grid).sum())} values off the grid, {int((~matches).sum())} not the nearest, "
                         f"{distinct} distinct values (at most {fmt.num_codes}).")

  config = (DDPMUNetConfig(resolution=8, in_channels=3, out_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(4,), dropout=0.0, num_groups=2) if tiny else
            DDPMUNetConfig(resolution=32, in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2, 2, 2),
                           num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, num_groups=8))
  model = DDPMUNet(config)
  xs, ts = model.example_inputs(4)
  variables = jax.jit(model.init)(jax.random.key(0), xs, ts)
  x_t = jax.random.normal(jax.random.key(1), xs.shape)
  t = jnp.full((4,), 500, jnp.int32)
  qstate = quant.calibrate(model, variables, [(x_t, t)], quant.QuantConfig(weight_bits=4, act_bits=4))
  fp = np.asarray(jax.jit(lambda v, x, t: model.apply(v, x, t))(variables, x_t, t))
  w4a4 = np.asarray(jax.jit(lambda v, x, t: quant.quantized_apply(model, v, qstate, x, t))(variables, x_t, t))
  relative = float(np.linalg.norm(w4a4 - fp) / np.linalg.norm(fp))
  if not relative > 1e-3:
    raise AssertionError(f"the W4A4 UNet's output under jit equals the FP output (relative difference "
                         f"{relative:.2e}): quantization was removed on {jax.devices()[0]}.")
  return {"fake_quant_on_grid": True, "fake_quant_distinct_values": distinct,
          "w4a4_vs_fp_relative_output_difference": relative}


def run(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m msfp_jax.bench device")
  parser.add_argument("--tiny", action="store_true", help="tiny models (the CPU test of this script)")
  parser.add_argument("--out", default="", help="also write the results as JSON here")
  args = parser.parse_args(argv or [])

  device = jax.devices()[0]
  result: dict = {"device": f"{device.platform} ({device.device_kind})", "jax": jax.__version__}
  stages = [
      ("fake_quant_check", lambda: check_fake_quant_not_identity(args.tiny)),
      ("sample", lambda: sample.run(["--tiny", "--batch", "2", "--steps", "2", "--repeats", "1"] if args.tiny else
                                    ["--batch", "64", "--steps", "20", "--repeats", "3"])),
      ("finetune", lambda: finetune.run(["--ch", "8", "--resolution", "8", "--batch", "2", "--repeats", "1"]
                                        if args.tiny else ["--ch", "128", "--batch", "64", "--repeats", "5"])),
  ]
  if not args.tiny:
    stages.append(("inception", lambda: inception.run(["--images", "1000", "--batch", "200"])))
  for name, fn in stages:
    start = time.perf_counter()
    print(f"=== device bench: {name} ===", flush=True)
    result[name] = fn()
    result[name]["wall_seconds"] = time.perf_counter() - start
    if args.out:  # written after every stage: a run cut short by the device's time limit keeps what it measured
      with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)
  return result


if __name__ == "__main__":
  run()
