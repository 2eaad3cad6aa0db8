"""Shortcut splitting: a layer fed by a marked concatenation gets one activation quantizer per part.

References: the parts' statistics in numpy float64, the layer run by hand on separately fake-quantized parts
(fake_quant called in the test), and a model whose concatenation is not marked (what split_shortcut=False
must reproduce bit for bit). The Concat here is the test's own module: rules match it by class name, so quant
needs nothing from msfp_jax.models.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msfp_jax.quant import (
  QuantConfig,
  QuantRule,
  QuantState,
  calibrate,
  discover_layers,
  fake_quant,
  format_report_table,
  layer_report,
  load_quant_state,
  quantized_apply,
  save_quant_state,
)


class Concat(nn.Module):
  @nn.compact
  def __call__(self, a, b):
    return jnp.concatenate([a, b], axis=-1)


class SkipNet(nn.Module):
  """Two sources of very different ranges joined, then a Dense on the join (like an up-block's shortcut)."""

  marked: bool = True
  cast_between: bool = False

  @nn.compact
  def __call__(self, x):
    wide = 20.0 * nn.Dense(6, name="deep")(x)  # range about +-40
    narrow = nn.silu(nn.Dense(4, name="skip")(x))  # one-sided, about [-0.28, 3]
    joined = Concat(name="concat")(wide, narrow) if self.marked else jnp.concatenate([wide, narrow], -1)
    if self.cast_between:
      joined = joined * 1.0
    return nn.Dense(5, name="shortcut")(joined)


@pytest.fixture(scope="module")
def setup():
  x = jax.random.normal(jax.random.key(0), (512, 8))
  variables = SkipNet().init(jax.random.key(1), x)
  batches = [(x[:256],), (x[256:],)]
  return x, variables, batches


def _config(**kw):
  return QuantConfig(samples_per_batch=1 << 14, samples_per_layer=1 << 15,
                     rules=(QuantRule(path="deep|skip", keep_fp=True),), **kw)


def test_discovery_links_the_layer_fed_by_the_concatenation(setup):
  x, variables, _ = setup
  layers = discover_layers(SkipNet(), variables, x, config=_config())
  assert layers["shortcut"].act_split == 6
  assert "concat" not in layers  # the join itself is never a quantized layer
  off = discover_layers(SkipNet(), variables, x, config=_config(split_shortcut=False))
  assert off["shortcut"].act_split is None
  by_rule = discover_layers(SkipNet(), variables, x, config=QuantConfig(
      rules=(QuantRule(path="deep|skip", keep_fp=True), QuantRule(path="shortcut", split_shortcut=False))))
  assert by_rule["shortcut"].act_split is None
  # The link is identity: an operation between the join and the layer breaks it (nothing is guessed).
  cast = discover_layers(SkipNet(cast_between=True), variables, x, config=_config())
  assert cast["shortcut"].act_split is None


def test_each_part_gets_its_own_searched_quantizer(setup):
  x, variables, batches = setup
  state = calibrate(SkipNet(), variables, batches, _config())
  layer = state.layers["shortcut"]
  p = variables["params"]
  x64 = np.asarray(x, np.float64)
  dense = lambda name: x64 @ np.asarray(p[name]["kernel"], np.float64) + np.asarray(p[name]["bias"], np.float64)
  wide, pre = 20.0 * dense("deep"), dense("skip")
  narrow = pre / (1.0 + np.exp(-pre))
  np.testing.assert_allclose(layer.act_range, (wide.min(), wide.max()), rtol=1e-5)
  np.testing.assert_allclose(layer.skip_act_range, (narrow.min(), narrow.max()), rtol=1e-5, atol=1e-6)
  # The wide part is two-sided (signed); the SiLU part one-sided, so mixup-sign gives it an unsigned format.
  assert layer.act_format.signed and not layer.skip_act_format.signed and layer.skip_one_sided
  assert float(layer.skip_act_maxval) < 0.2 * float(layer.act_maxval)


def test_quantized_apply_quantizes_the_parts_separately(setup):
  x, variables, batches = setup
  state = calibrate(SkipNet(), variables, batches, _config())
  layer = state.layers["shortcut"]
  got = jax.jit(lambda v, x: quantized_apply(SkipNet(), v, state, x))(variables, x)
  p = variables["params"]
  wide = 20.0 * (x @ p["deep"]["kernel"] + p["deep"]["bias"])
  narrow = nn.silu(x @ p["skip"]["kernel"] + p["skip"]["bias"])
  joined = jnp.concatenate([fake_quant(wide, layer.act_format, layer.act_maxval, 0.0),
                            fake_quant(narrow, layer.skip_act_format, layer.skip_act_maxval,
                                       layer.skip_act_zero_point)], -1)
  kernel = fake_quant(p["shortcut"]["kernel"], layer.weight_format, layer.weight_maxval)
  want = joined @ kernel + p["shortcut"]["bias"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # With one quantizer over both parts the narrow part falls between the wide grid's levels.
  one = calibrate(SkipNet(), variables, batches, _config(split_shortcut=False)).layers["shortcut"]
  single = fake_quant(jnp.concatenate([wide, narrow], -1), one.act_format, one.act_maxval,
                      0.0 if one.act_zero_point is None else one.act_zero_point)[:, 6:]
  split_error = float(jnp.mean((joined[:, 6:] - narrow) ** 2))
  assert split_error < 0.05 * float(jnp.mean((single - narrow) ** 2))


def test_split_off_is_exactly_the_unmarked_model(setup):
  x, variables, batches = setup
  off = calibrate(SkipNet(), variables, batches, _config(split_shortcut=False))
  unmarked = calibrate(SkipNet(marked=False), variables, batches, _config(split_shortcut=True))
  assert off.layers["shortcut"].act_split is None
  jax.tree.map(np.testing.assert_array_equal, off.to_dict()["arrays"], unmarked.to_dict()["arrays"])
  assert off.to_dict()["metadata"] == unmarked.to_dict()["metadata"]
  np.testing.assert_array_equal(quantized_apply(SkipNet(), variables, off, x),
                                quantized_apply(SkipNet(marked=False), variables, unmarked, x))


def test_split_state_round_trips_and_the_report_shows_both_parts(setup, tmp_path):
  x, variables, batches = setup
  state = calibrate(SkipNet(), variables, batches, _config())
  save_quant_state(tmp_path / "q", state)
  loaded = load_quant_state(tmp_path / "q")
  assert loaded.layers["shortcut"].act_split == 6
  assert loaded.layers["shortcut"].skip_act_format == state.layers["shortcut"].skip_act_format
  np.testing.assert_array_equal(quantized_apply(SkipNet(), variables, loaded, x),
                                quantized_apply(SkipNet(), variables, state, x))
  table = format_report_table(layer_report(state))
  assert "shortcut [:6]" in table and "shortcut [6:] skip" in table
  assert "1 with split inputs" in table


def test_a_state_written_before_shortcut_splitting_still_loads(setup):
  x, variables, batches = setup
  d = calibrate(SkipNet(), variables, batches, _config(split_shortcut=False)).to_dict()
  for meta in d["metadata"]["layers"]:  # what version-1 files of earlier releases hold
    for key in ("skip_act_format", "skip_act_mse"):
      meta.pop(key)
  state = QuantState.from_dict(d)
  assert state.layers["shortcut"].act_split is None and state.layers["shortcut"].skip_act_format is None
