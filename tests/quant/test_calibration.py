"""Calibration statistics and the format / maxval / zero-point search, against independent references.

References: numpy float64 forward passes for the statistics, brute-force fake_quant evaluation of every
candidate for the search, and the output error of the quantized network for the mixup-sign claim of
method.md section 3.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msfp_jax.quant import (
  ActivationStatistics,
  CalibrationError,
  FPFormat,
  InvalidQuantConfigError,
  QuantConfig,
  QuantRule,
  calibrate,
  collect_statistics,
  fake_quant,
  quantized_apply,
  search_activation_quantizer,
  search_weight_quantizer,
)
from msfp_jax.quant.search import maxval_factors


class DenseSiluDense(nn.Module):
  """The toy network of method.md section 3."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(64, name="dense1", kernel_init=nn.initializers.normal(1.0))(x)
    return nn.Dense(16, name="dense2")(nn.silu(h))


class LogNet(nn.Module):
  """Produces NaN after its first layer for negative pre-activations."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="dense2")(jnp.log(nn.Dense(8, name="dense1")(x)))


def _float64_forward_inputs(params, x):
  """Inputs of dense1 and dense2 of DenseSiluDense in numpy float64."""
  x = np.asarray(x, np.float64)
  h = x @ np.asarray(params["dense1"]["kernel"], np.float64) + np.asarray(params["dense1"]["bias"], np.float64)
  return {"dense1": x, "dense2": h / (1.0 + np.exp(-h))}


@pytest.fixture(scope="module")
def toy():
  model = DenseSiluDense()
  # Pre-activation std about 3.5 (16 inputs of std 0.875, unit-normal weights): a wide SiLU input.
  x = jax.random.normal(jax.random.key(1), (256, 16)) * 0.875
  variables = model.init(jax.random.key(0), x)
  return model, variables, x


def test_statistics_equal_float64_reference(toy):
  model, variables, x = toy
  batches = [(x[:96],), (x[96:200],), x[200:]]  # a bare array is one positional argument
  config = QuantConfig(samples_per_batch=1 << 14, samples_per_layer=1 << 15)
  stats = collect_statistics(model, variables, batches, config)
  assert stats.num_batches == 3
  reference = _float64_forward_inputs(variables["params"], x)
  for path in ("dense1", "dense2"):
    (layer_stats,) = stats.activations[path]
    ref = reference[path]
    np.testing.assert_allclose(layer_stats.min, ref.min(), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(layer_stats.max, ref.max(), rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(layer_stats.absmax, np.abs(ref).max(), rtol=2e-6, atol=1e-6)
    # Everything fits in the reservoir, so it holds exactly the layer's inputs.
    np.testing.assert_allclose(np.sort(layer_stats.samples), np.sort(ref.ravel()), rtol=2e-5, atol=2e-6)


def test_reservoir_is_bounded_and_uniform_over_batches():
  stats = ActivationStatistics(capacity=1000, rng=np.random.default_rng(0))
  for batch in range(10):  # 10 batches of 500 values, batch b holds the value b
    stats.update(batch, batch, np.full(500, batch, np.float32))
  assert stats.samples.shape == (1000,)
  assert (stats.min, stats.max) == (0, 9)
  counts = np.bincount(stats.samples.astype(int), minlength=10)
  # A uniform sample of 1000 out of 5000 values takes about 100 from each batch (binomial sd about 9.5).
  assert counts.min() >= 60 and counts.max() <= 140, counts


def test_subsampling_bounds_memory_for_large_inputs(toy):
  model, variables, x = toy
  config = QuantConfig(samples_per_batch=100, samples_per_layer=250)
  stats = collect_statistics(model, variables, [(x[:128],), (x[128:],)] * 2, config)
  (dense2,) = stats.activations["dense2"]
  assert dense2.samples.shape == (250,)
  inputs = _float64_forward_inputs(variables["params"], x)["dense2"].ravel()
  # Subsamples are actual input values (not interpolations).
  distance = np.abs(dense2.samples[:, None].astype(np.float64) - inputs[None, :]).min(axis=1)
  assert distance.max() < 1e-5


def test_mixup_sign_search_on_the_toy_network(toy):
  """method.md section 3: unsigned + zero point for the SiLU-fed layer, about half the error of signed.

  With free zero points the search lands near the MSE optimum -0.14; with the zero point on the grid (the
  default) it takes the on-grid value that costs least, and real 0 is then a level.
  """
  model, variables, x = toy
  batches = [(x[:128],), (x[128:],)]
  y_fp = model.apply(variables, x)
  errors, states = {}, {}
  for mode, on_grid in (("search", False), ("search", True), ("signed", True)):
    # dense1 stays FP so that the output error is that of the SiLU-fed layer's quantizers.
    config = QuantConfig(sign_mode=mode, samples_per_batch=1 << 16, zero_point_on_grid=on_grid,
                         rules=(QuantRule(path="dense1", keep_fp=True),))
    states[mode, on_grid] = state = calibrate(model, variables, batches, config)
    y_q = jax.jit(lambda v, x, s=state: quantized_apply(model, v, s, x))(variables, x)
    errors[mode, on_grid] = float(jnp.mean((y_q - y_fp) ** 2))
  free, on_grid = states["search", False].layers["dense2"], states["search", True].layers["dense2"]
  for chosen in (free, on_grid):
    assert chosen.one_sided and not chosen.act_format.signed
    assert chosen.act_format in FPFormat.candidates(4, signed=False)
    assert chosen.act_range[0] == pytest.approx(-0.27846, abs=1e-4)  # the SiLU minimum
  # The MSE optimum is about -0.14; the zero-point grid (17 values from min to 0) has a step of 0.017.
  assert -0.17 <= float(free.act_zero_point) <= -0.11
  # On the grid: -z is a level of the grid (z + maxval * unit), so fake_quant(0) is exactly 0.
  assert float(fake_quant(jnp.zeros(()), on_grid.act_format, on_grid.act_maxval, on_grid.act_zero_point)) == 0.0
  assert float(fake_quant(jnp.zeros(()), free.act_format, free.act_maxval, free.act_zero_point)) != 0.0
  assert on_grid.act_mse >= free.act_mse  # a constrained search cannot beat the free one
  signed = states["signed", True].layers["dense2"]
  assert signed.act_format.signed
  # Weights are searched identically in every mode.
  assert signed.weight_format == free.weight_format == on_grid.weight_format
  # "halves the output error" (measured 0.52 with free zero points, 0.58 with the zero point on the grid)
  assert errors["search", False] / errors["signed", True] < 0.6, errors
  assert errors["search", True] / errors["signed", True] < 0.65, errors


def _brute_force_activation(samples, formats_and_zero_points, factors, top, on_grid=False):
  """Best (mse, format, maxval, zero_point) by evaluating fake_quant on every candidate.

  on_grid: each unsigned candidate (z, maxval) moves z to minus the level of the grid of maxval (the
  format's own code values) nearest -z, so that 0 is a level.
  """
  best = None
  x = jnp.asarray(samples, jnp.float32)
  for fmt, zero_points in formats_and_zero_points:
    for z in zero_points:
      maxvals = factors * (top - z if not fmt.signed else top)
      if on_grid and not fmt.signed:
        zs = np.array([-grid[np.argmin(np.abs(grid + z))] for grid in map(fmt.grid, maxvals)])
      else:
        zs = np.full(len(maxvals), z)
      mse = jax.vmap(lambda m, z, fmt=fmt: jnp.mean((fake_quant(x, fmt, m, z) - x) ** 2))(
          jnp.asarray(maxvals, jnp.float32), jnp.asarray(zs, jnp.float32))
      q = int(jnp.argmin(mse))
      if best is None or float(mse[q]) < best[0]:
        best = (float(mse[q]), fmt, float(maxvals[q]), float(zs[q]))
  return best


@pytest.mark.parametrize("on_grid", [False, True], ids=["free_zero_point", "zero_point_on_grid"])
@pytest.mark.parametrize("sign_mode", ["search", "signed", "unsigned"])
def test_activation_search_equals_brute_force_fake_quant(sign_mode, on_grid):
  rng = np.random.default_rng(3)
  h = rng.normal(size=3000) * 2.5
  samples = (h / (1.0 + np.exp(-h))).astype(np.float32)
  lo, hi = float(samples.min()), float(samples.max())
  config = QuantConfig(sign_mode=sign_mode, maxval_grid_size=40, zero_point_grid_size=5,
                       zero_point_on_grid=on_grid)
  choice = search_activation_quantizer(samples, lo, hi, 4, sign_mode, config)
  factors = maxval_factors(config)
  signed = [(f, [0.0]) for f in FPFormat.candidates(4, signed=True)]
  unsigned = [(f, list(np.linspace(lo, 0.0, 5))) for f in FPFormat.candidates(4, signed=False)]
  pool = {"search": signed + unsigned, "signed": signed, "unsigned": unsigned}[sign_mode]
  mse, fmt, maxval, zero_point = _brute_force_activation(samples, pool, factors, max(abs(lo), hi) if
                                                         sign_mode == "signed" else hi, on_grid)
  if sign_mode == "search":  # signed candidates scale with absmax, unsigned with max - z: evaluate separately
    s = _brute_force_activation(samples, signed, factors, max(abs(lo), hi))
    u = _brute_force_activation(samples, unsigned, factors, hi, on_grid)
    mse, fmt, maxval, zero_point = min(s, u, key=lambda t: t[0])
  assert choice.format == fmt
  assert choice.maxval == pytest.approx(maxval, rel=1e-6)
  assert (choice.zero_point or 0.0) == pytest.approx(zero_point, abs=1e-6)
  assert choice.mse == pytest.approx(mse, rel=1e-4)
  assert choice.one_sided
  if on_grid and choice.zero_point is not None:
    assert float(fake_quant(jnp.zeros(()), choice.format, choice.maxval, choice.zero_point)) == 0.0


def test_two_sided_input_stays_signed_in_every_mode():
  samples = np.random.default_rng(0).normal(size=2000).astype(np.float32)
  for mode in ("search", "unsigned"):
    choice = search_activation_quantizer(samples, samples.min(), samples.max(), 4, mode, QuantConfig())
    assert choice.format.signed and choice.zero_point is None and not choice.one_sided


def test_weight_search_is_per_channel_and_equals_brute_force():
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(3, 3, 4, 6)) * np.array([0.01, 0.1, 1.0, 3.0, 0.5, 0.05])  # conv HWIO
  config = QuantConfig(maxval_grid_size=50)
  choice = search_weight_quantizer(kernel, 4, config)
  assert choice.maxval.shape == (6,) and choice.zero_point is None
  rows = jnp.asarray(kernel.reshape(-1, 6), jnp.float32)
  absmax = np.abs(kernel.reshape(-1, 6)).max(axis=0)
  factors = maxval_factors(config)
  totals = {}
  for fmt in FPFormat.candidates(4, signed=True):
    maxvals = jnp.asarray(factors[:, None] * absmax[None, :], jnp.float32)  # [C, out]
    err = jax.vmap(lambda m, fmt=fmt: jnp.mean((fake_quant(rows, fmt, m) - rows) ** 2, axis=0))(maxvals)  # [C, out]
    best = np.argmin(np.asarray(err), axis=0)
    totals[fmt] = (float(np.asarray(err).min(axis=0).mean()), factors[best] * absmax)
  fmt = min(totals, key=lambda f: totals[f][0])
  assert choice.format == fmt
  np.testing.assert_allclose(choice.maxval, totals[fmt][1], rtol=1e-6)
  assert choice.mse == pytest.approx(totals[fmt][0], rel=1e-4)
  # Per channel: the maxvals follow the channels' scales (spanning 300x here).
  assert np.all(np.diff(choice.maxval[[0, 5, 1, 4, 2, 3]]) > 0)


def test_int_weight_search_is_asymmetric_per_channel():
  rng = np.random.default_rng(2)
  kernel = rng.normal(size=(10, 5)) + np.array([0.0, 2.0, -2.0, 0.5, 0.0])  # channels with offsets
  config = QuantConfig(kind="int", maxval_grid_size=60)
  choice = search_weight_quantizer(kernel, 4, config)
  assert choice.format == FPFormat(0, 4, signed=False) and choice.format.name == "uINT4"
  low = np.minimum(kernel.min(axis=0), 0.0)
  width = np.maximum(kernel.max(axis=0), 0.0) - low
  factors = maxval_factors(config)
  x = jnp.asarray(kernel, jnp.float32)
  err = jax.vmap(lambda c: jnp.mean((fake_quant(x, choice.format, c * width, c * low) - x) ** 2, axis=0))(
      jnp.asarray(factors, jnp.float32))
  best = np.argmin(np.asarray(err), axis=0)
  np.testing.assert_allclose(choice.maxval, factors[best] * width, rtol=1e-6)
  np.testing.assert_allclose(choice.zero_point, factors[best] * low, rtol=1e-6, atol=1e-7)
  assert choice.mse == pytest.approx(float(np.asarray(err).min(axis=0).mean()), rel=1e-4)


def test_int_kind_calibrates_through_the_same_path(toy):
  model, variables, x = toy
  qstate = calibrate(model, variables, [(x,)], QuantConfig(kind="int"))
  assert qstate.kind == "int"
  for path in ("dense1", "dense2"):
    layer = qstate.layers[path]
    assert layer.weight_format.name == "uINT4" and layer.act_format.name == "uINT4"
    assert layer.weight_zero_point.shape == layer.weight_maxval.shape == (layer.weight_maxval.shape[0],)
    assert float(layer.act_zero_point) <= 0.0
  y_fp = model.apply(variables, x)
  y_int = quantized_apply(model, variables, qstate, x)
  error = float(jnp.mean((y_int - y_fp) ** 2))
  assert 0.0 < error < 0.1 * float(jnp.mean(y_fp ** 2))


# ----------------------------------------------------------------------------- bad input
def test_no_batches_is_an_error(toy):
  model, variables, _ = toy
  with pytest.raises(CalibrationError, match="no batches"):
    calibrate(model, variables, [], QuantConfig())
  with pytest.raises(CalibrationError, match="no batches"):
    calibrate(model, variables, iter(()), QuantConfig())


def test_nan_in_calibration_data_names_the_layer(toy):
  model, variables, x = toy
  bad = x.at[3, 2].set(jnp.nan)
  with pytest.raises(CalibrationError, match=r"batch 1: the input of layer 'dense1' contains 1 NaN"):
    calibrate(model, variables, [(x,), (bad,)], QuantConfig())
  log_model = LogNet()
  log_variables = log_model.init(jax.random.key(0), x)
  with pytest.raises(CalibrationError, match=r"layer 'dense2' contains \d+ NaN"):
    calibrate(log_model, log_variables, [(x,)], QuantConfig())


@pytest.mark.parametrize("field, value", [("weight_bits", 1), ("kind", "float"), ("sign_mode", "both"),
                                          ("maxval_grid_min", 0.0), ("rules", ("conv.*",))])
def test_invalid_config_values_are_errors(field, value):
  with pytest.raises(InvalidQuantConfigError, match=field):
    QuantConfig(**{field: value})


def test_negative_exponent_bits_are_an_error():
  with pytest.raises(ValueError, match="exponent_bits must be >= 0"):
    FPFormat(-1, 2)


def test_rules_that_leave_nothing_to_quantize_are_an_error(toy):
  model, variables, x = toy
  with pytest.raises(CalibrationError, match="no layer to quantize"):
    calibrate(model, variables, [(x,)], QuantConfig(rules=(QuantRule(keep_fp=True),)))
