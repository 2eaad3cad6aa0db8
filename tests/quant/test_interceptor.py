"""The quantization interceptor: jit behaviour, exact layer semantics, prequantized weights, kernel_update,
MatMul operands, gradients and checkpointing of the QuantState.

References: the un-intercepted model applied to hand-quantized inputs and kernels (fake_quant called in the
test), and plain model.apply for the FP path.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msfp_jax.models.attention import MatMul
from msfp_jax.quant import (
  FPFormat,
  LayerQuantState,
  QuantConfig,
  QuantRule,
  QuantState,
  QuantStateMismatchError,
  calibrate,
  fake_quant,
  load_quant_state,
  prequantize_weights,
  quantization_interceptor,
  quantized_apply,
  save_quant_state,
)


class Block(nn.Module):
  @nn.compact
  def __call__(self, h):
    h = nn.Conv(8, (3, 3), kernel_dilation=2, feature_group_count=2, padding="SAME", name="conv")(nn.silu(h))
    return nn.Dense(6, use_bias=False, name="dense")(nn.silu(h))


class ConvNet(nn.Module):
  """Convs with strides, dilation, groups and padding choices, then SiLU-fed Dense layers."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(8, (3, 3), strides=2, padding=((1, 0), (0, 1)), name="conv_in")(x)
    h = Block(name="block")(h)
    return nn.Dense(3, name="out")(nn.silu(h))


class AttnNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    q = nn.Dense(4, name="q")(x)
    scores = MatMul("bqc,bkc->bqk", name="qk_matmul")(q, x)
    return nn.Dense(2, name="out")(scores)


@pytest.fixture(scope="module")
def calibrated():
  model = ConvNet()
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  variables = model.init(jax.random.key(0), x)
  batches = [(jax.random.normal(jax.random.key(i), (4, 8, 8, 3)),) for i in range(2, 5)]
  qstate = calibrate(model, variables, batches, QuantConfig(weight_bits=4, act_bits=4))
  return model, variables, x, qstate


def test_jitted_quantized_apply_differs_and_fp_apply_stays_fp(calibrated):
  model, variables, x, qstate = calibrated
  fp_fn = jax.jit(model.apply)
  q_fn = jax.jit(lambda v, s, x: quantized_apply(model, v, s, x))
  y_ref = model.apply(variables, x)
  y_fp_before = fp_fn(variables, x)
  y_q = q_fn(variables, qstate, x)
  y_fp_after = fp_fn(variables, x)
  np.testing.assert_allclose(y_fp_before, y_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y_fp_after, y_fp_before)
  error = float(jnp.mean((y_q - y_ref) ** 2))
  assert error > 1e-6 * float(jnp.mean(y_ref ** 2))
  assert error < 0.2 * float(jnp.mean(y_ref ** 2))
  # A second FP function traced after the quantized one is also FP (no interceptor leaks).
  np.testing.assert_allclose(jax.jit(lambda v, x: model.apply(v, x))(variables, x), y_ref, rtol=1e-5, atol=1e-6)


def test_single_layer_matches_hand_quantized_reference():
  """Clone-based kernel replacement keeps strides, padding, dilation, groups and bias exactly."""
  conv = nn.Conv(6, (3, 3), strides=(2, 1), kernel_dilation=(1, 2), feature_group_count=2,
                 padding=((2, 0), (1, 1)), name="c")
  x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
  variables = conv.init(jax.random.key(1), x)
  kernel = variables["params"]["kernel"]
  layer = LayerQuantState(module_type="Conv", act_format=FPFormat(2, 2, signed=False),
                          act_maxval=jnp.float32(2.5), act_zero_point=jnp.float32(-0.5),
                          weight_format=FPFormat(2, 1), weight_maxval=jnp.linspace(0.2, 0.4, 6))
  qstate = QuantState(layers={"": layer})  # the top-level module's path is ''
  y = jax.jit(lambda v, x: quantized_apply(conv, v, qstate, x))(variables, x)
  hand = {"params": {"kernel": fake_quant(kernel, FPFormat(2, 1), jnp.linspace(0.2, 0.4, 6)),
                     "bias": variables["params"]["bias"]}}
  y_ref = conv.apply(hand, fake_quant(x, FPFormat(2, 2, signed=False), 2.5, -0.5))
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)


def test_prequantized_weights_equal_on_the_fly(calibrated):
  model, variables, x, qstate = calibrated
  on_the_fly = jax.jit(lambda v, s, x: quantized_apply(model, v, s, x))(variables, qstate, x)
  pre = jax.jit(prequantize_weights)(variables, qstate)
  prequantized = jax.jit(lambda v, s, x: quantized_apply(model, v, s, x, weights_prequantized=True))(
      pre, qstate, x)
  np.testing.assert_allclose(prequantized, on_the_fly, rtol=1e-6, atol=1e-6)
  layer = qstate.layers["block/conv"]
  np.testing.assert_array_equal(
      pre["params"]["block"]["conv"]["kernel"],
      fake_quant(variables["params"]["block"]["conv"]["kernel"], layer.weight_format, layer.weight_maxval))
  with pytest.raises(ValueError, match="prequantize_weights"):
    quantized_apply(model, pre, qstate, x, weights_prequantized=True, kernel_update=lambda p, k: k)


def test_kernel_update_is_applied_before_weight_quantization(calibrated):
  model, variables, x, qstate = calibrated
  delta = {path: 0.05 * jax.random.normal(jax.random.key(7), variables["params"]["block"]["dense"]["kernel"].shape)
           for path in ("block/dense",)}
  seen = []

  def kernel_update(path, kernel):
    seen.append(path)
    return kernel + delta[path] if path in delta else kernel

  y = jax.jit(lambda v, s, x: quantized_apply(model, v, s, x, kernel_update=kernel_update))(variables, qstate, x)
  assert sorted(set(seen)) == sorted(qstate.layers)  # called for every quantized layer
  # Reference 1: W_q = Q(W + dW) computed by hand with fake_quant, through prequantize_weights' output.
  layer = qstate.layers["block/dense"]
  kernel = variables["params"]["block"]["dense"]["kernel"]
  by_hand = fake_quant(kernel + delta["block/dense"], layer.weight_format, layer.weight_maxval)
  pre = prequantize_weights(variables, qstate, kernel_update=kernel_update)
  np.testing.assert_array_equal(pre["params"]["block"]["dense"]["kernel"], by_hand)
  assert not np.array_equal(by_hand, fake_quant(kernel, layer.weight_format, layer.weight_maxval))
  # Reference 2: quantizing variables that already hold W + dW gives the same output.
  shifted = jax.tree.map(lambda a: a, variables)
  shifted["params"]["block"]["dense"]["kernel"] = kernel + delta["block/dense"]
  y_ref = jax.jit(lambda v, s, x: quantized_apply(model, v, s, x))(shifted, qstate, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)


def test_weight_maxvals_are_per_output_channel(calibrated):
  _, variables, _, qstate = calibrated
  for path, (names, out) in {"conv_in": (("conv_in",), 8), "block/conv": (("block", "conv"), 8),
                             "block/dense": (("block", "dense"), 6), "out": (("out",), 3)}.items():
    layer = qstate.layers[path]
    assert layer.weight_maxval.shape == (out,) and layer.weight_zero_point is None
    kernel = variables["params"]
    for name in names:
      kernel = kernel[name]
    absmax = np.abs(np.asarray(kernel["kernel"]).reshape(-1, out)).max(axis=0)
    ratio = np.asarray(layer.weight_maxval) / absmax
    assert np.all((ratio >= 0.05 - 1e-6) & (ratio <= 1.2 + 1e-6))
    assert len(np.unique(np.round(np.asarray(layer.weight_maxval), 6))) > 1


def test_attention_matmul_operands_quantized_when_enabled():
  model = AttnNet()
  x = jax.random.normal(jax.random.key(0), (2, 5, 4))
  variables = model.init(jax.random.key(1), x)
  config = QuantConfig(act_bits=4, rules=(QuantRule(path="qk_matmul", module_types=("MatMul",)),))
  qstate = calibrate(model, variables, [(x,)], config)
  layer = qstate.layers["qk_matmul"]
  assert layer.is_matmul and layer.weight_maxval is None and layer.rhs_act_format is not None
  q_in = nn.Dense(4).apply({"params": variables["params"]["q"]}, x)
  captured = {}

  def record(path, kernel):
    return kernel

  with quantization_interceptor(qstate, kernel_update=record):
    y = model.apply(variables, x)
  # Reference for the scores: einsum of the hand-quantized operands (with the q projection quantized).
  ql = qstate.layers["q"]
  q_hand = nn.Dense(4).apply({"params": {"kernel": fake_quant(variables["params"]["q"]["kernel"], ql.weight_format,
                                                              ql.weight_maxval),
                                         "bias": variables["params"]["q"]["bias"]}},
                             fake_quant(x, ql.act_format, ql.act_maxval, 0.0 if ql.act_zero_point is None
                                        else ql.act_zero_point))
  zp = lambda z: 0.0 if z is None else z
  scores = jnp.einsum("bqc,bkc->bqk", fake_quant(q_hand, layer.act_format, layer.act_maxval, zp(layer.act_zero_point)),
                      fake_quant(x, layer.rhs_act_format, layer.rhs_act_maxval, zp(layer.rhs_act_zero_point)))
  ol = qstate.layers["out"]
  y_ref = nn.Dense(2).apply({"params": {"kernel": fake_quant(variables["params"]["out"]["kernel"], ol.weight_format,
                                                             ol.weight_maxval),
                                        "bias": variables["params"]["out"]["bias"]}},
                            fake_quant(scores, ol.act_format, ol.act_maxval, zp(ol.act_zero_point)))
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  assert not np.allclose(q_in, q_hand)
  del captured


def test_state_from_another_model_is_an_error(calibrated):
  _, _, _, qstate = calibrated
  model = AttnNet()
  x = jnp.ones((1, 3, 4))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(QuantStateMismatchError, match="calibrated for another model"):
    quantized_apply(model, variables, qstate, x)
  # strict=False lets unknown layers (e.g. a router applied inside the context) pass through; the layer
  # 'out' exists in both models but with another kernel shape, which is still caught.
  with pytest.raises(QuantStateMismatchError, match=r"layer 'out': .* \(3,\) weight maxvals but the kernel"):
    quantized_apply(model, variables, qstate, x, strict=False)
  router = nn.Dense(2)
  router_variables = router.init(jax.random.key(1), x)
  with quantization_interceptor(qstate, strict=False):
    routed = router.apply(router_variables, x)
  np.testing.assert_array_equal(routed, router.apply(router_variables, x))


def test_quantizer_parameters_are_trainable_leaves(calibrated):
  model, variables, x, qstate = calibrated
  leaves = jax.tree.leaves(qstate)
  assert len(leaves) == sum(2 + (layer.act_zero_point is not None) for layer in qstate.layers.values())
  y_ref = model.apply(variables, x)
  loss = lambda s: jnp.mean((quantized_apply(model, variables, s, x) - y_ref) ** 2)
  grads = jax.jit(jax.grad(loss))(qstate)
  assert jax.tree.structure(grads) == jax.tree.structure(qstate)
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads))


def test_quant_state_round_trips_through_dict_and_checkpoint(calibrated, tmp_path):
  _, _, _, qstate = calibrated
  restored = QuantState.from_dict(qstate.to_dict())
  assert jax.tree.structure(restored) == jax.tree.structure(qstate)
  jax.tree.map(np.testing.assert_array_equal, restored, qstate)
  save_quant_state(tmp_path / "qstate", qstate)
  loaded = load_quant_state(tmp_path / "qstate")
  assert jax.tree.structure(loaded) == jax.tree.structure(qstate)
  jax.tree.map(np.testing.assert_array_equal, loaded, qstate)
  with pytest.raises(FileNotFoundError, match="save_quant_state"):
    load_quant_state(tmp_path / "missing")


def test_nonpositive_maxval_is_an_error(calibrated):
  _, variables, _, qstate = calibrated
  layer = qstate.layers["out"]
  broken = QuantState(layers={**qstate.layers, "out": layer.replace(weight_maxval=layer.weight_maxval.at[0].set(0.0))},
                      unquantized=qstate.unquantized)
  with pytest.raises(ValueError, match="maxval must be positive"):
    prequantize_weights(variables, broken)
