"""Quantize-dequantize with a straight-through / LSQ custom VJP (method.md section 2).

  u     = x - z
  x_hat = z + Q(clip(u, lo, maxval)),      lo = -maxval (signed) or 0 (unsigned)

Q rounds onto the format's grid whose largest value is maxval: Q(v; maxval) = s * Q_nat(v / s) with
s = maxval / natural_max (the real-valued bias follows maxval, so the grid scales with it; s is rounded
to 23 - M significant bits so that s * Q_nat is exact, see grid_scale).

Gradients (rounding treated as the identity, as in LSQ):
  d x_hat / d x      = 1 inside [lo, maxval] (in u), 0 outside (the clipped straight-through estimator)
  d x_hat / d maxval = (Q(u) - u) / maxval inside; 1 above the range; -1 below it (signed), 0 (unsigned)
  d x_hat / d z      = 1 - [u inside the range]
The first line of the maxval gradient follows from the scaling: Q(u; maxval) = maxval * Q(u / maxval; 1),
so dQ/dmaxval = Q/maxval - u/maxval when dQ/du is taken as 1.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax.quant.formats import FPFormat
from msfp_jax.quant.numerics import round_to_natural_grid


def as_format(fmt) -> FPFormat:
  """Accept an FPFormat or its name ("E2M1", "uE2M2", "INT4")."""
  if isinstance(fmt, FPFormat):
    return fmt
  if isinstance(fmt, str):
    return FPFormat.from_name(fmt)
  raise ValueError(f"expected an FPFormat or a format name such as 'E2M1', got {fmt!r}")


def _check_concrete_maxval(maxval) -> None:
  """Raise ValueError for a concrete maxval that is not positive and finite (tracers pass unchecked)."""
  if isinstance(maxval, jax.core.Tracer):
    return
  values = np.asarray(maxval, dtype=np.float64)
  if values.size == 0:
    raise ValueError("fake_quant: maxval is empty")
  bad = ~(np.isfinite(values) & (values > 0))
  if bad.any():
    first = values.reshape(-1)[np.flatnonzero(bad.reshape(-1))[0]]
    raise ValueError(
        f"fake_quant: maxval must be positive and finite, got {first} at {int(bad.sum())} of "
        f"{values.size} position(s); a grid needs a positive largest value (calibrate the layer, or "
        "floor maxval at a small positive number for all-zero channels)")


def _scale_rounding(fmt: FPFormat) -> tuple[int, int]:
  """(half, mask) for rounding a float32 scale to 23 - M significant bits through its bit pattern."""
  dropped = fmt.mantissa_bits + 1
  return 1 << (dropped - 1), (0xFFFFFFFF >> dropped) << dropped


def grid_scale(maxval: jax.Array, fmt: FPFormat) -> jax.Array:
  """The grid's scale s (x_hat = s * natural value + z): maxval / natural_max, in float32.

  s is computed as maxval * float32(1 / natural_max) (XLA turns a division by a constant into a
  multiplication by its reciprocal in some graphs and not in others) and then rounded to nearest at
  23 - M significant bits, so that s * y_hat is exact in float32 for every natural-grid value y_hat
  (at most M + 1 significant bits). Then z + s * y_hat rounds once whether or not the compiler fuses it
  into an FMA (XLA on CPU does in some kernels and not in others), and the export decoder reproduces
  fake_quant bit for bit. The relative change of the grid is below 2^-(23 - M) (6e-8 for M = 0).
  """
  half, mask = _scale_rounding(fmt)
  scale = jnp.asarray(maxval, jnp.float32) * np.float32(1.0 / fmt.natural_max)
  bits = jax.lax.bitcast_convert_type(scale, jnp.uint32)
  return jax.lax.bitcast_convert_type((bits + np.uint32(half)) & np.uint32(mask), jnp.float32)


def grid_scale_numpy(maxval, fmt: FPFormat) -> np.ndarray:
  """numpy twin of ``grid_scale`` (same bits)."""
  half, mask = _scale_rounding(fmt)
  scale = np.asarray(maxval, np.float32) * np.float32(1.0 / fmt.natural_max)
  bits = np.asarray(scale, np.float32).view(np.uint32)
  return ((bits + np.uint32(half)) & np.uint32(mask)).view(np.float32)


def quantize_shifted(x: jax.Array, fmt: FPFormat, maxval: jax.Array, zero_point: jax.Array):
  """The shared forward arithmetic: returns (y_hat, scale) with x_hat = y_hat * scale + zero_point.

  y_hat lies exactly on the natural grid (so ``numerics.natural_codes`` can encode it); the export
  decoder repeats the same float32 operations to reproduce x_hat bit for bit. The largest output is
  maxval up to the rounding of the scale (see ``grid_scale``).
  """
  scale = grid_scale(maxval, fmt)
  y_hat = round_to_natural_grid((x - zero_point) * (np.float32(1.0) / scale), fmt)
  return y_hat, scale


def _forward(fmt: FPFormat, x, maxval, zero_point):
  y_hat, scale = quantize_shifted(x, fmt, maxval, zero_point)
  return y_hat * scale + zero_point


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fake_quant(fmt: FPFormat, x, maxval, zero_point):
  return _forward(fmt, x, maxval, zero_point)


def _fake_quant_fwd(fmt: FPFormat, x, maxval, zero_point):
  # Residuals: the three inputs. The backward pass recomputes the (cheap, elementwise) rounding instead
  # of keeping two more full-size arrays (u and Q(u)) alive until the backward pass.
  return _forward(fmt, x, maxval, zero_point), (x, maxval, zero_point)


def _sum_to_shape(g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sum a broadcast gradient back to an operand's shape (undo numpy broadcasting)."""
  if g.shape == tuple(shape):
    return g
  lead = g.ndim - len(shape)
  if lead:
    g = jnp.sum(g, axis=tuple(range(lead)))
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and g.shape[i] != 1)
  if axes:
    g = jnp.sum(g, axis=axes, keepdims=True)
  return g.reshape(shape)


def _fake_quant_bwd(fmt: FPFormat, residuals, g):
  x, maxval, zero_point = residuals
  u = x - zero_point
  y_hat, scale = quantize_shifted(x, fmt, maxval, zero_point)
  q = y_hat * scale
  lower = -maxval if fmt.signed else jnp.zeros_like(maxval)
  above = u > maxval
  below = u < lower
  inside = (u >= lower) & (u <= maxval)      # False for NaN: a NaN input passes no gradient
  zero = jnp.zeros_like(g)
  grad_x = jnp.where(inside, g, zero)
  clipped_slope = jnp.where(above, 1.0, jnp.where(below, -1.0 if fmt.signed else 0.0, 0.0))
  d_maxval = jnp.where(inside, (q - u) / maxval, clipped_slope)
  grad_maxval = g * d_maxval
  grad_zero_point = jnp.where(above | below, g, zero)
  return (_sum_to_shape(grad_x, x.shape),
          _sum_to_shape(grad_maxval, maxval.shape),
          _sum_to_shape(grad_zero_point, zero_point.shape))


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x, fmt, maxval, zero_point=0.0) -> jax.Array:
  """Quantize-dequantize ``x`` onto ``fmt``'s grid with largest value ``maxval``.

  Args:
    x: input array (any float dtype; rounding is done in float32 and the result cast back).
    fmt: FPFormat or its name.
    maxval: largest grid value, > 0; a scalar or an array broadcastable against x (per-channel).
    zero_point: z (<= 0 for the usual post-SiLU use); the grid is shifted to start at z for unsigned
      formats (x_hat = z + Q+(clip(x - z, 0, maxval))). Scalar or broadcastable like maxval.

  Returns:
    x_hat with the broadcast shape of (x, maxval, zero_point); NaN stays NaN, +-Inf saturates.
    Differentiable in x (clipped straight-through), maxval and zero_point (LSQ); see the module docstring.

  Raises:
    ValueError: for an unknown format or a concrete maxval that is not positive and finite.
  """
  fmt = as_format(fmt)
  _check_concrete_maxval(maxval)
  x = jnp.asarray(x)
  out_dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
  result = _fake_quant(fmt, x.astype(jnp.float32), jnp.asarray(maxval, jnp.float32),
                       jnp.asarray(zero_point, jnp.float32))
  return result.astype(out_dtype)
