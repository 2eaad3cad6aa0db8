"""LoRA factors and the timestep router, against independent references (PyTorch convs, numpy math)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from msfp_jax import lora


def test_conv_update_equals_conv_a_then_1x1_b_in_torch():
  """dW[kh,kw,i,o] = sum_r A[kh,kw,i,r] B[r,o] is the kernel of "conv A (layer's kernel), then 1x1 conv B"."""
  rng = np.random.default_rng(0)
  bank = lora.init_lora_bank(jax.random.key(0), (3, 3, 5, 7), rank=2, num_banks=1)
  a = np.array(bank["a"][0])
  b = rng.normal(size=(2, 7)).astype(np.float32)  # B is zero at init; use a random one for the identity.
  x = rng.normal(size=(2, 6, 6, 5)).astype(np.float32)
  delta = lora.lora_delta(jnp.asarray(a), jnp.asarray(b))
  ours = nn.Conv(7, (3, 3), padding=((1, 1), (1, 1)), use_bias=False).apply(
      {"params": {"kernel": delta}}, jnp.asarray(x))
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  a_t = torch.from_numpy(a).permute(3, 2, 0, 1)            # [r, in, kh, kw]
  b_t = torch.from_numpy(b).T[:, :, None, None].contiguous()  # [out, r, 1, 1]
  ref = torch.nn.functional.conv2d(torch.nn.functional.conv2d(xt, a_t, padding=1), b_t)
  np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


def test_dense_update_and_init_distribution():
  bank = lora.init_lora_bank(jax.random.key(1), (256, 64), rank=16, num_banks=3)
  a, b = np.asarray(bank["a"]), np.asarray(bank["b"])
  assert a.shape == (3, 256, 16) and b.shape == (3, 16, 64)
  assert not b.any(), "B must start at zero"
  bound = 1 / np.sqrt(256)  # Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  assert np.abs(a).max() <= bound
  np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.05)
  assert not np.allclose(a[0], a[1]), "each bank draws its own A"
  w = np.array([0.0, 1.0, 0.0], np.float32)
  rng = np.random.default_rng(2)
  bank = {"a": jnp.asarray(a), "b": jnp.asarray(rng.normal(size=b.shape).astype(np.float32))}
  mixed = lora.mixed_lora_delta(bank, jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(mixed), a[1].astype(np.float64) @ np.asarray(bank["b"][1], np.float64),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_banks", [1, 3, 4])
def test_router_initial_allocation_is_contiguous_equal_shares(num_banks):
  config = lora.RouterConfig(num_banks=num_banks, num_timesteps=1000)
  params = lora.init_router(jax.random.key(0), config)
  got = lora.allocation(params, config)
  t = np.arange(1000)
  expected = np.floor((t + 0.5) * num_banks / 1000).astype(int)  # bank k owns [kT/K, (k+1)T/K)
  np.testing.assert_array_equal(got, expected)
  counts = np.bincount(got, minlength=num_banks)
  assert counts.max() - counts.min() <= 1


def test_route_is_hard_one_hot_forward_and_softmax_backward():
  logits = jnp.asarray([[0.3, 2.0, -1.0, 0.5]])
  w = lora.straight_through_one_hot(logits)
  np.testing.assert_array_equal(np.asarray(w), [[0, 1, 0, 0]])
  v = jnp.asarray([1.0, -2.0, 0.5, 3.0])
  grad_st = jax.grad(lambda z: jnp.sum(lora.straight_through_one_hot(z) * v))(logits)
  grad_soft = jax.grad(lambda z: jnp.sum(jax.nn.softmax(z, axis=-1) * v))(logits)
  np.testing.assert_allclose(np.asarray(grad_st), np.asarray(grad_soft), rtol=1e-6)


def test_balance_loss_is_one_when_even_and_k_when_collapsed():
  k = 4
  even = jnp.asarray(np.eye(k, dtype=np.float32) * 100.0)
  collapsed = jnp.asarray(np.tile(np.array([100.0, 0, 0, 0], np.float32), (k, 1)))
  np.testing.assert_allclose(float(lora.balance_loss(even)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(float(lora.balance_loss(collapsed)), k, rtol=1e-5)


def test_bad_input_has_one_clear_error():
  with pytest.raises(ValueError, match="K >= 1"):
    lora.RouterConfig(num_banks=0)
  with pytest.raises(ValueError, match="rank must be >= 1"):
    lora.init_lora_bank(jax.random.key(0), (4, 4), rank=0)
  with pytest.raises(ValueError, match="banks K must be >= 1"):
    lora.init_lora_bank(jax.random.key(0), (4, 4), rank=2, num_banks=0)
  with pytest.raises(ValueError, match="K >= 1"):
    lora.TALoRAConfig(num_banks=0, router=lora.RouterConfig(num_banks=0))
  config = lora.RouterConfig(num_banks=2, num_timesteps=100)
  params = lora.init_router(jax.random.key(0), config)
  with pytest.raises(ValueError, match="integer diffusion timesteps"):
    lora.route(params, config, jnp.asarray([0.5, 0.2]))          # noise levels, not timesteps
  with pytest.raises(ValueError, match="integer diffusion timesteps"):
    lora.route(params, config, 0.5)
  with pytest.raises(ValueError, match=r"shape \[\] or \[batch\]"):
    lora.route(params, config, jnp.zeros((2, 8, 8, 3), jnp.int32))  # an image
  with pytest.raises(ValueError, match=r"\[0, 100\)"):
    lora.route(params, config, jnp.asarray([100], jnp.int32))
