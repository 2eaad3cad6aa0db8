"""TALoRA through the real quantization interceptor on a toy Flax conv net."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msfp_jax import lora, quant


class ToyNet(nn.Module):
  """conv -> SiLU -> conv -> Dense head; takes (x, t) like the diffusion models (t unused)."""

  @nn.compact
  def __call__(self, x, t):
    del t
    h = nn.silu(nn.Conv(8, (3, 3), name="conv_a")(x))
    h = nn.silu(nn.Conv(8, (3, 3), name="conv_b")(h))
    return nn.Dense(3, name="head")(h)


@pytest.fixture(scope="module")
def toy():
  model = ToyNet()
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
  t = jnp.full((4,), 500, jnp.int32)
  variables = model.init(jax.random.key(1), x, t)
  config = quant.QuantConfig(weight_bits=4, act_bits=4)
  qstate = quant.calibrate(model, variables, [(x, t)], config)
  layers = quant.discover_layers(model, variables, x, t, config=config)
  return model, variables, qstate, layers, x, t


def _talora_config(k=3, rank=2):
  return lora.TALoRAConfig(num_banks=k, rank=rank, router=lora.RouterConfig(num_banks=k, num_timesteps=1000))


def test_zero_b_gives_exactly_the_ptq_model(toy):
  model, variables, qstate, layers, x, t = toy
  cfg = _talora_config()
  params = lora.init_talora(jax.random.key(2), layers, cfg)
  assert set(lora.flat_banks(params["banks"])) == {"conv_a", "conv_b", "head"}
  update = lora.make_kernel_update(params, cfg, t)
  # The quantized weights are bit-identical to PTQ's ...
  with_lora = quant.prequantize_weights(variables, qstate, kernel_update=update)
  ptq_weights = quant.prequantize_weights(variables, qstate)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), with_lora, ptq_weights)
  for path in lora.flat_banks(params["banks"]):
    kernel = variables["params"][path]["kernel"]
    np.testing.assert_array_equal(np.asarray(update(path, kernel)), np.asarray(kernel))
  # ... so the outputs agree up to XLA's float reassociation between two differently fused programs.
  apply = jax.jit(lambda p: quant.quantized_apply(model, variables, qstate, x, t,
                                                  kernel_update=lora.make_kernel_update(p, cfg, t)))
  ptq = jax.jit(lambda: quant.quantized_apply(model, variables, qstate, x, t))()
  np.testing.assert_allclose(np.asarray(apply(params)), np.asarray(ptq), rtol=0, atol=1e-6)


def test_update_is_merged_before_weight_quantization(toy):
  """Q(W + dW) of the routed bank: equal to the PTQ model run on variables whose kernels are W + A_k B_k."""
  model, variables, qstate, layers, x, t = toy
  cfg = _talora_config()
  params = lora.init_talora(jax.random.key(3), layers, cfg)
  rng = np.random.default_rng(0)
  params["banks"] = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(np.float32) * 0.1),
                                 params["banks"])
  k = int(np.floor((500 + 0.5) * 3 / 1000))  # the bank owning t = 500 at init
  merged = jax.tree.map(np.asarray, variables)
  for path, bank in lora.flat_banks(params["banks"]).items():
    a, b = np.asarray(bank["a"][k], np.float64), np.asarray(bank["b"][k], np.float64)
    merged["params"][path]["kernel"] = (merged["params"][path]["kernel"] + np.tensordot(a, b, axes=1)).astype(
        np.float32)
  got = jax.jit(lambda: quant.quantized_apply(model, variables, qstate, x, t,
                                              kernel_update=lora.make_kernel_update(params, cfg, t)))()
  want = jax.jit(lambda: quant.quantized_apply(model, merged, qstate, x, t))()
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  other = jax.jit(lambda: quant.quantized_apply(model, variables, qstate, x, jnp.full((4,), 10, jnp.int32),
                                                kernel_update=lora.make_kernel_update(
                                                    params, cfg, jnp.full((4,), 10, jnp.int32))))()
  assert not np.allclose(np.asarray(other), np.asarray(got)), "another timestep range must use another bank"


def test_k1_is_plain_lora_and_router_gets_straight_through_gradient(toy):
  model, variables, qstate, layers, x, t = toy
  cfg1 = _talora_config(k=1)
  params1 = lora.init_talora(jax.random.key(4), layers, cfg1)
  for tt in (0, 999):
    np.testing.assert_array_equal(np.asarray(lora.route_batch(params1["router"], cfg1, jnp.asarray([tt]))), [1.0])
  cfg = _talora_config()
  params = lora.init_talora(jax.random.key(5), layers, cfg)
  params["banks"] = jax.tree.map(lambda a: a + 0.05, params["banks"])

  def loss(p):
    y = quant.quantized_apply(model, variables, qstate, x, t, kernel_update=lora.make_kernel_update(p, cfg, t))
    return jnp.mean(y ** 2)
  grads = jax.grad(loss)(params)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads["router"]))
  assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads["banks"]))


def test_lora_attaching_nowhere_and_mixed_timesteps_are_errors(toy):
  model, variables, qstate, layers, x, t = toy
  none_quantized = quant.discover_layers(
      model, variables, x, t, config=quant.QuantConfig(rules=(quant.QuantRule(path=".*", keep_fp=True),)))
  with pytest.raises(lora.LoRAAttachError, match="attaches to no layer"):
    lora.init_talora(jax.random.key(0), none_quantized, _talora_config())
  with pytest.raises(lora.LoRAAttachError, match="attaches to no layer"):
    lora.init_talora(jax.random.key(0), layers, lora.TALoRAConfig(
        num_banks=2, rank=2, module_types=("Embed",), router=lora.RouterConfig(num_banks=2)))
  cfg = _talora_config()
  params = lora.init_talora(jax.random.key(0), layers, cfg)
  with pytest.raises(ValueError, match="share the timestep"):
    lora.make_kernel_update(params, cfg, jnp.asarray([10, 900, 10, 10], jnp.int32))
