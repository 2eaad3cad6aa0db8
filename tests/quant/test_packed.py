"""The packed model file: codes decode to exactly the fake-quantized kernels, and it is small."""
import json
import zipfile

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


class NarrowNet(nn.Module):
  """Many narrow layers, where per-entry file overhead would dominate (a small UNet has ~65 such layers)."""
  num_layers: int = 20

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = nn.silu(nn.Dense(64, name=f"dense_{i}")(x))
    return x


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


@pytest.fixture(scope="module")
def narrow():
  model = NarrowNet()
  x = jax.random.normal(jax.random.key(0), (8, 64))
  variables = model.init(jax.random.key(1), x)
  return variables, calibrate(model, variables, [(x,)], QuantConfig(weight_bits=4, act_bits=4))


def test_entry_count_does_not_grow_with_layers(narrow, tmp_path):
  variables, qstate = narrow
  banks = [variables, _with_delta(variables, 3), _with_delta(variables, 4)]
  packed.export_packed(tmp_path / "m.npz", banks, qstate, extra_arrays={"bank_of_timestep": np.zeros(10, np.uint8)})
  with zipfile.ZipFile(tmp_path / "m.npz") as archive:
    names = sorted(name.removesuffix(".npy") for name in archive.namelist())
  # metadata.json + one code blob per bank + one float32 blob + the extras, for any number of layers.
  assert names == ["codes/bank0", "codes/bank1", "codes/bank2", "extra/bank_of_timestep", "float32", "metadata.json"]
  loaded = packed.load_packed(tmp_path / "m.npz")
  assert loaded.extra["bank_of_timestep"].dtype == np.uint8
  for bank, decoded in zip(banks, loaded.variables_per_bank):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 prequantize_weights(bank, qstate), decoded)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), qstate, loaded.qstate)


def test_many_narrow_layers_stay_small(narrow, tmp_path):
  variables, qstate = narrow
  sizes = packed.export_packed(tmp_path / "one_bank.npz", [variables], qstate)
  kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables) if path[-1].key == "kernel"]
  num_params = sum(np.size(leaf) for leaf in jax.tree.leaves(variables))
  num_kernel = sum(np.size(k) for k in kernels)
  num_qstate = sum(np.size(leaf) for leaf in jax.tree.leaves(qstate))
  assert sizes["codes"] == num_kernel // 2  # two 4-bit codes a byte, no per-layer padding (even sizes)
  assert sizes["float"] == 4 * (num_params - num_kernel + num_qstate)
  # Codes (1/8) plus biases and per-channel maxvals (1/64 each here) are ~0.154x; what the file adds on top
  # is one JSON and a handful of entry headers, deflated with the rest.
  payload = (sizes["codes"] + sizes["float"]) / sizes["float32_equivalent"]
  assert payload < 0.155
  assert sizes["file"] / sizes["float32_equivalent"] <= 0.16


def _write_npz(path, **arrays):
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def test_other_versions_and_foreign_files_are_refused(narrow, tmp_path):
  variables, qstate = narrow
  packed.export_packed(tmp_path / "v2.npz", [variables], qstate)
  with np.load(tmp_path / "v2.npz") as archive:
    arrays = {name: archive[name] for name in archive.files}
  document = json.loads(arrays["metadata.json"].tobytes())
  # A version-1 file: per-layer entries, refused by its version number rather than misread.
  v1 = {"metadata.json": np.frombuffer(json.dumps({**document, "version": 1}).encode(), np.uint8),
        "bank0/layer_0000": arrays["codes/bank0"][:2048], "float/params/dense_0/bias": np.zeros(64, np.float32)}
  _write_npz(tmp_path / "v1.npz", **v1)
  with pytest.raises(packed.PackedModelError, match="version 1 is not supported"):
    packed.load_packed(tmp_path / "v1.npz")
  _write_npz(tmp_path / "foreign.npz", weights=np.ones(3))
  with pytest.raises(packed.PackedModelError, match="no metadata.json"):
    packed.load_packed(tmp_path / "foreign.npz")
  del arrays["float32"]
  _write_npz(tmp_path / "truncated.npz", **arrays)
  with pytest.raises(packed.PackedModelError, match="lacks the entries"):
    packed.load_packed(tmp_path / "truncated.npz")
