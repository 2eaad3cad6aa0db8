"""fake_quant: per-channel broadcasting, the custom VJP checked numerically, NaN and bad input.

Gradient oracle: central finite differences in float64 numpy of the straight-through surrogate
    x_hat_ste(x, maxval, z) = z + clip(x - z, lo, maxval) + (maxval / natural_max) * delta0,
delta0 = R(v0) - v0 being the rounding offset on the natural grid, frozen at the base point (v0 the
clipped input in natural units, R the nearest natural-grid value by brute force). The surrogate equals
the quantizer at the base point and treats rounding as the identity, which is the definition of the
STE/LSQ gradients; its derivatives are computed by finite differences, not by formula.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msfp_jax.quant.fake_quant import fake_quant
from msfp_jax.quant.formats import FPFormat

EPS = 1e-5


def nearest_natural(v, fmt):
  grid = fmt.grid()
  return grid[np.argmin(np.abs(v[..., None] - grid), axis=-1)]


def reference_forward(x, fmt, maxval, zero_point):
  """float64 numpy quantizer: nearest value of the grid scaled to maxval (random data: no ties)."""
  scale = maxval / fmt.natural_max
  lower = -maxval if fmt.signed else 0.0 * maxval
  v = np.clip(x - zero_point, lower, maxval) / scale
  return zero_point + scale * nearest_natural(v, fmt)


def ste_surrogate(x0, fmt, maxval0, zero_point0):
  """The straight-through surrogate around the base point (see the module docstring)."""
  scale0 = maxval0 / fmt.natural_max
  lower0 = -maxval0 if fmt.signed else 0.0 * maxval0
  v0 = np.clip(x0 - zero_point0, lower0, maxval0) / scale0
  delta0 = nearest_natural(v0, fmt) - v0

  def surrogate(x, maxval, zero_point):
    lower = -maxval if fmt.signed else 0.0 * maxval
    return zero_point + np.clip(x - zero_point, lower, maxval) + maxval / fmt.natural_max * delta0
  return surrogate


def central_difference(f, args, which):
  plus = list(args)
  minus = list(args)
  plus[which] = args[which] + EPS
  minus[which] = args[which] - EPS
  return (f(*plus) - f(*minus)) / (2 * EPS)


def make_case(fmt, seed, channels=4):
  """x [8, 3, channels] with per-channel maxval/zero point, points kept away from the clip edges."""
  rng = np.random.default_rng(seed)
  maxval = rng.uniform(0.5, 2.0, size=channels)
  zero_point = -rng.uniform(0.1, 0.3, size=channels) if not fmt.signed else np.zeros(channels)
  x = rng.normal(size=(8, 3, channels)) * 1.5
  lower = -maxval if fmt.signed else 0.0 * maxval
  u = x - zero_point
  near_edge = (np.abs(u - maxval) < 1e-3) | (np.abs(u - lower) < 1e-3)
  x = np.where(near_edge, x + 0.01, x)
  # float32 inputs, float64 copies of exactly those values for the oracle
  return (x.astype(np.float32).astype(np.float64), maxval.astype(np.float32).astype(np.float64),
          zero_point.astype(np.float32).astype(np.float64))


@pytest.mark.parametrize("fmt", [FPFormat(2, 1), FPFormat(3, 0), FPFormat(1, 3, False),
                                 FPFormat(2, 2, False), FPFormat(0, 4, False)])
def test_custom_vjp_matches_finite_differences_of_ste_surrogate(fmt):
  x, maxval, zero_point = make_case(fmt, seed=fmt.format_id)
  cotangent = np.random.default_rng(3).normal(size=x.shape)
  out, vjp = jax.vjp(lambda a, m, z: fake_quant(a, fmt, m, z),
                     jnp.asarray(x, jnp.float32), jnp.asarray(maxval, jnp.float32),
                     jnp.asarray(zero_point, jnp.float32))
  grad_x, grad_maxval, grad_zero_point = vjp(jnp.asarray(cotangent, jnp.float32))
  np.testing.assert_allclose(np.asarray(out), reference_forward(x, fmt, maxval, zero_point), atol=1e-5)

  surrogate = ste_surrogate(x, fmt, maxval, zero_point)
  args = (x, maxval, zero_point)
  np.testing.assert_allclose(surrogate(*args), reference_forward(*args[:1], fmt, *args[1:]), atol=1e-12)
  d_x = central_difference(surrogate, args, 0)
  d_maxval = central_difference(surrogate, args, 1)      # per element, w.r.t. its own channel
  d_zero_point = central_difference(surrogate, args, 2)
  assert grad_x.shape == x.shape and grad_maxval.shape == maxval.shape
  assert grad_zero_point.shape == zero_point.shape
  np.testing.assert_allclose(np.asarray(grad_x), cotangent * d_x, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad_maxval), (cotangent * d_maxval).sum(axis=(0, 1)),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(grad_zero_point), (cotangent * d_zero_point).sum(axis=(0, 1)),
                             rtol=1e-4, atol=1e-5)
  # The straight-through gradient for x is exactly the in-range mask (1 inside, 0 outside).
  lower = -maxval if fmt.signed else 0.0 * maxval
  inside = ((x - zero_point) >= lower) & ((x - zero_point) <= maxval)
  assert inside.any() and (~inside).any()
  ones = jax.grad(lambda a: fake_quant(a, fmt, maxval.astype(np.float32),
                                       zero_point.astype(np.float32)).sum())(x.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(ones), inside.astype(np.float32))


def test_maxval_gradient_rounding_part_is_the_grid_scaling():
  """Away from rounding boundaries the true derivative of x_hat in maxval is Q/maxval (the grid scales
  with maxval); LSQ's gradient is that minus the straight-through term u/maxval."""
  fmt = FPFormat(2, 1)
  rng = np.random.default_rng(7)
  x = rng.uniform(-1.9, 1.9, size=500).astype(np.float32).astype(np.float64)
  maxval = 2.0
  grid = fmt.grid(maxval)
  mids = (grid[1:] + grid[:-1]) / 2
  x = x[np.min(np.abs(x[:, None] - mids), axis=1) > 1e-3]
  step = 1e-6
  true_derivative = (reference_forward(x, fmt, maxval + step, 0.0)
                     - reference_forward(x, fmt, maxval - step, 0.0)) / (2 * step)
  per_element = jax.vmap(jax.grad(lambda a, m: fake_quant(a, fmt, m), argnums=1), in_axes=(0, None))(
      jnp.asarray(x, jnp.float32), jnp.float32(maxval))
  np.testing.assert_allclose(np.asarray(per_element) + x / maxval, true_derivative, atol=1e-5)


@pytest.mark.parametrize("fmt", [FPFormat(2, 1), FPFormat(2, 2, False)])
def test_per_channel_broadcasting_equals_per_channel_loop(fmt):
  rng = np.random.default_rng(11)
  x = rng.normal(size=(6, 5, 4)).astype(np.float32)
  maxval = rng.uniform(0.3, 2.0, size=4).astype(np.float32)
  zero_point = (-rng.uniform(0, 0.3, size=4) if not fmt.signed else np.zeros(4)).astype(np.float32)
  out = np.asarray(fake_quant(x, fmt, maxval, zero_point))
  for c in range(4):
    np.testing.assert_array_equal(out[..., c],
                                  np.asarray(fake_quant(x[..., c], fmt, maxval[c], zero_point[c])))
  # keepdims-shaped parameters give the same values and gradients of their own shape
  kept = np.asarray(fake_quant(x, fmt, maxval.reshape(1, 1, 4), zero_point.reshape(1, 1, 4)))
  np.testing.assert_array_equal(out, kept)
  grads = jax.grad(lambda m, z: fake_quant(x, fmt, m, z).sum(), argnums=(0, 1))(
      maxval.reshape(1, 1, 4), zero_point.reshape(1, 1, 4))
  flat = jax.grad(lambda m, z: fake_quant(x, fmt, m, z).sum(), argnums=(0, 1))(maxval, zero_point)
  assert grads[0].shape == (1, 1, 4) and grads[1].shape == (1, 1, 4)
  np.testing.assert_allclose(np.asarray(grads[0]).reshape(4), np.asarray(flat[0]), rtol=1e-6)
  # channel maxval along axis 0 (an output-channel-first layout)
  by_rows = np.asarray(fake_quant(x, fmt, np.full((6, 1, 1), 0.7, np.float32)))
  np.testing.assert_array_equal(by_rows, np.asarray(fake_quant(x, fmt, 0.7)))


@pytest.mark.parametrize("fmt", [FPFormat(2, 1), FPFormat(2, 2, False), FPFormat(0, 3)])
def test_nan_stays_nan_and_infinities_saturate(fmt):
  x = np.array([np.nan, 1.0, np.inf, -np.inf, -np.nan, 0.0], np.float32)
  for quantize in (fake_quant, jax.jit(fake_quant, static_argnums=1)):
    out = np.asarray(quantize(x, fmt, 1.5, -0.25))
    assert np.isnan(out[0]) and np.isnan(out[4])
    assert np.isfinite(out[[1, 2, 3, 5]]).all()
    np.testing.assert_allclose(out[2], 1.25, rtol=1e-6)
    np.testing.assert_allclose(out[3], -1.75 if fmt.signed else -0.25, rtol=1e-6)
  grad_maxval = jax.grad(lambda m: fake_quant(x, fmt, m, -0.25).sum())(1.5)
  grad_x = jax.grad(lambda a: fake_quant(a, fmt, 1.5).sum())(x)
  assert np.isfinite(grad_maxval)
  assert np.asarray(grad_x)[0] == 0.0


def test_low_precision_inputs_keep_their_dtype():
  x = jnp.linspace(-2, 2, 33, dtype=jnp.bfloat16)
  out = fake_quant(x, "E2M1", 2.0)
  assert out.dtype == jnp.bfloat16
  full = fake_quant(np.asarray(x, np.float32), "E2M1", 2.0)
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(full.astype(jnp.bfloat16), np.float32))


@pytest.mark.parametrize("maxval", [0.0, -1.0, np.array([1.0, 0.0]), np.nan, np.inf])
def test_nonpositive_maxval_raises(maxval):
  with pytest.raises(ValueError, match="maxval must be positive and finite"):
    fake_quant(np.ones((3, 2), np.float32), FPFormat(2, 1), maxval)


def test_traced_maxval_is_accepted_and_bad_formats_raise():
  out = jax.jit(lambda m: fake_quant(jnp.array([0.3, 5.0]), FPFormat(2, 1), m))(jnp.float32(3.0))
  np.testing.assert_array_equal(np.asarray(out), [0.25, 3.0])
  with pytest.raises(ValueError, match="cannot parse FP format name"):
    fake_quant(np.ones(3), "E2", 1.0)
  with pytest.raises(ValueError, match="expected an FPFormat"):
    fake_quant(np.ones(3), 4, 1.0)
  with pytest.raises(ValueError, match="exponent_bits must be at most 7"):
    fake_quant(np.ones(3), "E8M3", 1.0)
