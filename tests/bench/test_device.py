"""The device script runs end to end on the CPU with tiny models, and its quantization check can fail."""
import json

import jax.numpy as jnp
import pytest

from msfp_jax.bench import device


def test_device_script_on_cpu_with_tiny_models(tmp_path):
  result = device.run(["--tiny", "--out", str(tmp_path / "device.json")])
  check = result["fake_quant_check"]
  assert check["fake_quant_on_grid"] and check["fake_quant_distinct_values"] <= 16
  assert check["w4a4_vs_fp_relative_output_difference"] > 1e-3
  assert result["sample"]["ratio_w4a4_ptq_vs_fp"] > 0 and result["finetune"]["ratio"] > 0
  assert json.loads((tmp_path / "device.json").read_text())["finetune"]["batch"] == 2


def test_quantizer_that_passes_values_through_is_caught(monkeypatch):
  # What a device that removed the rounding would produce: the identity.
  monkeypatch.setattr("msfp_jax.quant.fake_quant", lambda x, fmt, maxval, zero_point=0.0: jnp.asarray(x))
  with pytest.raises(AssertionError, match="does not round to the E2M1 grid"):
    device.check_fake_quant_not_identity(tiny=True)
