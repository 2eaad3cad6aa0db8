"""The packed model file: codes decode to exactly the fake-quantized kernels, and it is small."""
import json
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msfp_jax.quant import QuantConfig, calibrate, packed, prequantize_weights, quantized_apply


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
  # Layers with an input zero point also carry their folded bias and one pad value (code domain).
  folded = [layer.weight_maxval.size + 1 for layer in qstate.layers.values() if layer.act_zero_point is not None]
  assert sizes["float"] == 4 * (num_params - num_kernel + num_qstate + sum(folded))
  # Codes (1/8) plus biases, per-channel maxvals and folded biases (1/64 each here) are ~0.17x; what the file
  # adds on top is one JSON and a handful of entry headers, deflated with the rest.
  payload = (sizes["codes"] + sizes["float"]) / sizes["float32_equivalent"]
  assert payload < 0.17
  assert sizes["file"] / sizes["float32_equivalent"] <= 0.175


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


class PaddedSiluNet(nn.Module):
  """SiLU-fed convs with every padding a UNet uses (explicit, SAME with stride and dilation), a Dense, and a
  split input, so that zero points meet zero padding."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), name="conv_a")(x)
    h = nn.Conv(16, (3, 3), strides=2, kernel_dilation=1, padding="SAME", name="conv_b")(nn.silu(h))
    h = nn.Conv(12, (3, 3), kernel_dilation=2, padding=((2, 2), (2, 2)), name="conv_c")(nn.silu(h))
    joined = Concat(name="concat")(h, nn.silu(h[..., :6]))
    h = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name="conv_split")(joined)
    return nn.Dense(5, name="head")(nn.silu(h))


class Concat(nn.Module):
  @nn.compact
  def __call__(self, a, b):
    return jnp.concatenate([a, b], axis=-1)


def _export_and_load(tmp_path, config, name):
  model = PaddedSiluNet()
  x = jax.random.normal(jax.random.key(0), (6, 12, 12, 3))
  variables = model.init(jax.random.key(1), x)
  qstate = calibrate(model, variables, [(x,)], config)
  banks = [variables, _with_delta(variables, 3)]
  packed.export_packed(tmp_path / name, banks, qstate)
  return model, banks, qstate, packed.load_packed(tmp_path / name), x


def test_code_domain_execution_with_folded_biases_equals_fake_quant(tmp_path):
  model, banks, qstate, loaded, x = _export_and_load(tmp_path, QuantConfig(), "on_grid.npz")
  with_zero_point = [p for p, layer in qstate.layers.items() if layer.act_zero_point is not None
                     or layer.skip_act_zero_point is not None]
  assert {"conv_b", "conv_c", "conv_split"} <= set(with_zero_point)  # SiLU-fed layers the search made unsigned
  assert qstate.layers["conv_split"].act_split == 12 and qstate.layers["conv_split"].skip_act_zero_point is not None
  assert set(loaded.code_domain_per_bank[0]) == set(with_zero_point)
  for bank, variables in enumerate(banks):
    entry = loaded.code_domain_per_bank[bank]["conv_b"]
    np.testing.assert_array_equal(entry.pad_value, -np.float32(qstate.layers["conv_b"].act_zero_point))
    # The folded bias against float64 numpy: b + sum over taps and inputs of W_q * z.
    w_q = np.asarray(loaded.variables_per_bank[bank]["params"]["conv_b"]["kernel"], np.float64)
    want = np.asarray(variables["params"]["conv_b"]["bias"], np.float64) + w_q.sum(axis=(0, 1, 2)) * float(
        qstate.layers["conv_b"].act_zero_point)
    np.testing.assert_allclose(entry.folded_bias, want, rtol=1e-5, atol=1e-6)
    fake = quantized_apply(model, variables, qstate, x) if bank == 0 else None
    code = jax.jit(lambda x, b=bank: packed.code_domain_apply(model, loaded, x, bank=b))(x)
    reference = jax.jit(lambda v, x: quantized_apply(model, v, loaded.qstate, x, weights_prequantized=True))(
        loaded.variables_per_bank[bank], x)
    np.testing.assert_allclose(code, reference, rtol=1e-4, atol=1e-4)
    if fake is not None:
      np.testing.assert_allclose(reference, fake, rtol=1e-5, atol=1e-5)


def test_code_domain_execution_shows_what_an_off_grid_zero_point_costs(tmp_path):
  # The control: with free zero points real 0 is no code, a kernel pads with the nearest one, and the
  # border outputs move, so the test above would fail if the zero points were not on the grid.
  model, banks, qstate, loaded, x = _export_and_load(tmp_path, QuantConfig(zero_point_on_grid=False), "free.npz")
  z = float(qstate.layers["conv_b"].act_zero_point)
  assert loaded.code_domain_per_bank[0]["conv_b"].pad_value[0] != -z
  code = packed.code_domain_apply(model, loaded, x)
  reference = quantized_apply(model, loaded.variables_per_bank[0], loaded.qstate, x, weights_prequantized=True)
  assert float(jnp.max(jnp.abs(code - reference))) > 1e-3
