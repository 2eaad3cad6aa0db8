"""Every benchmark of `python -m msfp_jax.bench` runs through its command line on a tiny model, in seconds, and
returns finite, positive timings (what the numbers mean is docs/benchmarks.md's business, not this test's)."""
import math

import pytest

from msfp_jax import bench
from msfp_jax.bench import __main__ as bench_main

# The arguments that make each benchmark tiny. `device --tiny` runs `sample` and `finetune` tiny inside it (with the
# arguments in msfp_jax/bench/device.py); tests/bench/test_device.py runs it and asserts their numbers, so they are
# not run twice here.
COVERED_BY_DEVICE = {"device", "sample", "finetune"}
TINY_ARGS = {
    "quant": ["--tiny", "--batch", "2", "--repeats", "1", "--calibration_batches", "1"],
    "unet": ["--tiny", "--batch", "2", "--repeats", "1", "--threads", "1", "--ddim-steps", "2"],
    "ldm": ["--tiny", "--batch", "1", "--repeats", "1", "--threads", "1"],
    "inception": ["--images", "2", "--size", "8", "--batch", "2", "--threads", "1"],
}
# A timing or ratio of each benchmark's result that must be a positive number.
TIMED = {"quant": "ratio", "unet": "ratio_torch_vs_flax", "ldm": "ratio_torch_vs_flax",
         "inception": "ratio_torch_over_flax"}


def test_every_benchmark_has_a_tiny_run():
  assert set(TINY_ARGS) | COVERED_BY_DEVICE == set(bench.BENCHMARKS), "a new benchmark needs its tiny arguments here"
  assert not set(TINY_ARGS) & COVERED_BY_DEVICE


@pytest.mark.parametrize("name", sorted(TINY_ARGS))
def test_benchmark_runs_tiny(name, monkeypatch, fid_torchscript_path):
  results = {}
  module = __import__(f"msfp_jax.bench.{name}", fromlist=["run"])
  real_run = module.run
  monkeypatch.setattr(module, "run", lambda argv: results.setdefault(name, real_run(argv)))
  if name == "inception":
    monkeypatch.setenv("MSFP_FID_TORCHSCRIPT", str(fid_torchscript_path))
  bench_main.main([name, *TINY_ARGS[name]])
  result = results[name]
  value = result[TIMED[name]]
  assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, result)
  if name == "unet":
    assert result["relative_difference"] < 1e-3, "the tiny Flax UNet computes what diffusers' does"
  if name == "inception":
    assert result["max_pool3_relative_error"] < 1e-3
  if name == "quant":
    assert result["output_rms_difference"] > 0 and result["quantized_layers"] > 0
