"""The packed model file: codes decode to exactly the fake-quantized kernels, and it is small."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msfp_jax.quant import QuantConfig, calibrate, prequantize_weights, quantized_apply
from msfp_jax.quant import packed


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(64, (3, 3), name="conv_a")(x)
    x = nn.silu(x)
    # Wide enough that kernels dominate the file, as in a real UNet (per-channel scales are fixed overhead).
    x = nn.Conv(256, (3, 3), name="conv_b")(x)
    x = nn.silu(x).mean(axis=(1, 2))
    return nn.Dense(16, name="head")(x)


@pytest.fixture(scope="module")
def calibrated():
  model = ConvNet()
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 8))
  variables = model.init(jax.random.key(1), x)
  qstate = calibrate(model, variables, [(x,)], QuantConfig(weight_bits=4, act_bits=4))
  return model, variables, qstate, x


def _with_delta(variables, seed):
  """A second weight set that differs only in quantized kernels (as a TALoRA bank does)."""
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: leaf + 0.01 * jax.random.normal(jax.random.key(seed), leaf.shape)
      if path[-1].key == "kernel" else leaf, variables["params"])
  return {"params": params}


def test_packed_round_trip_is_bit_exact_per_bank(calibrated, tmp_path):
  model, variables, qstate, x = calibrated
  banks = [variables, _with_delta(variables, 7)]
  sizes = packed.export_packed(tmp_path / "model.npz", banks, qstate, metadata={"note": "test"},
                               extra_arrays={"bank_of_timestep": np.arange(10) % 2})
  loaded = packed.load_packed(tmp_path / "model.npz")
  assert loaded.metadata == {"note": "test"}
  np.testing.assert_array_equal(loaded.extra["bank_of_timestep"], np.arange(10) % 2)
  assert len(loaded.variables_per_bank) == 2
  for bank, decoded in zip(banks, loaded.variables_per_bank):
    expected = prequantize_weights(bank, qstate)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), expected, decoded)
    # The model run from the packed file computes what the fake-quantized model computes.
    y_packed = jax.jit(lambda v, x: quantized_apply(model, v, loaded.qstate, x, weights_prequantized=True))(
        decoded, x)
    y_fake = jax.jit(lambda v, x: quantized_apply(model, v, qstate, x))(bank, x)
    np.testing.assert_array_equal(np.asarray(y_packed), np.asarray(y_fake))
  assert sizes["file"] == (tmp_path / "model.npz").stat().st_size


def test_packed_file_is_about_an_eighth_of_float32(calibrated, tmp_path):
  _, variables, qstate, _ = calibrated
  sizes = packed.export_packed(tmp_path / "one_bank.npz", [variables], qstate)
  num_params = sum(np.size(leaf) for leaf in jax.tree.leaves(variables))
  assert sizes["float32_equivalent"] == 4 * num_params
  # 4-bit codes are 1/8 of float32; biases, maxvals and the zip directory add a little.
  assert sizes["file"] / sizes["float32_equivalent"] < 0.14


def test_banks_may_differ_only_in_quantized_kernels(calibrated, tmp_path):
  _, variables, qstate, _ = calibrated
  other = jax.tree.map(lambda leaf: leaf + 1.0, variables)  # biases differ too
  with pytest.raises(packed.PackedModelError, match="not a quantized kernel"):
    packed.export_packed(tmp_path / "bad.npz", [variables, other], qstate)


def test_bad_files_give_one_clear_error(tmp_path):
  with pytest.raises(packed.PackedModelError, match="No packed model"):
    packed.load_packed(tmp_path / "missing.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(packed.PackedModelError, match="not a packed msfp_jax model"):
    packed.load_packed(tmp_path / "junk.npz")
