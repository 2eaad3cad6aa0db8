"""Arithmetic FP rounding in float32 (method.md section 2).

Rounding never casts through a low-precision dtype: XLA's float-conversion simplification can remove a
float32 -> float4 -> float32 cast pair (it does on GPU), which would silently switch quantization off.

The work happens on the format's *natural* grid (integer bias ``fmt.natural_bias``). A grid with any
other (real-valued) bias is the natural grid scaled by a constant, x_hat(x; b) = s * x_hat_nat(x / s)
with s = 2^(natural_bias - b) = maxval / natural_max, so callers scale into the natural domain, round
there exactly, and scale back. On the natural grid every quantity is exact in float32:

  k     = clamp(floor(log2|y|), 1 - b0, max(2^E - 1, 1) - b0) - M     (exponent of the grid step)
  y_hat = round_half_even(y * 2^-k) * 2^k

floor(log2|y|) is read from the float32 exponent field (exact, unlike a float32 log2 at powers of two);
a subnormal or zero y reads as -127, which the clamp maps to the format's subnormal step. The clamp also
keeps 2^k a normal float32, so 2^k is built from its bit pattern.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax.quant.formats import FPFormat


def _two_pow(k: jax.Array) -> jax.Array:
  """2.0**k as float32 for int32 k in the normal range [-126, 127], built from the bit pattern."""
  return jax.lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


def _step_exponent(y: jax.Array, fmt: FPFormat) -> jax.Array:
  """Exponent k of the natural-grid step for each float32 y (any sign), int32."""
  b0 = fmt.natural_bias
  bits = jax.lax.bitcast_convert_type(y, jnp.int32)
  floor_log2 = ((bits >> 23) & 0xFF) - 127
  lowest = 1 - b0                            # binade of the subnormals (and of the smallest normals)
  highest = max(fmt.max_exponent, 1) - b0    # binade of the largest value
  return jnp.clip(floor_log2, lowest, highest) - fmt.mantissa_bits


def round_to_natural_grid(y: jax.Array, fmt: FPFormat) -> jax.Array:
  """Round float32 ``y`` to the nearest value of ``fmt``'s natural grid, ties to even, saturating.

  Signed formats saturate at +-natural_max, unsigned ones clip to [0, natural_max]. NaN stays NaN.
  """
  y = jnp.asarray(y, jnp.float32)
  top = np.float32(fmt.natural_max)
  y = jnp.clip(y, -top if fmt.signed else np.float32(0.0), top)
  k = _step_exponent(y, fmt)
  # Both products are exact (multiplication by a power of two within float32's normal range).
  return jnp.round(y * _two_pow(-k)) * _two_pow(k)


def fp_round(x: jax.Array, fmt: FPFormat, bias=None) -> jax.Array:
  """Round ``x`` onto ``fmt``'s grid with exponent ``bias`` (real-valued; default the natural bias).

  Saturating, round half to even, float32 arithmetic. With a non-integer bias the result is the natural
  rounding of x / s scaled by s = 2^(natural_bias - bias) (see the module docstring); ``fake_quant``
  does the same with s = maxval / natural_max.
  """
  x = jnp.asarray(x, jnp.float32)
  if bias is None:
    return round_to_natural_grid(x, fmt)
  scale = jnp.exp2(jnp.float32(fmt.natural_bias) - jnp.asarray(bias, jnp.float32))
  return round_to_natural_grid(x / scale, fmt) * scale


def natural_codes(y_hat: jax.Array, fmt: FPFormat) -> jax.Array:
  """Bit patterns (int32) of values ``y_hat`` that lie exactly on ``fmt``'s natural grid.

  Inverse of ``FPFormat.code_values()`` (natural bias): sign bit (signed formats, taken from the sign of
  y_hat, so -0.0 gives the negative-zero code), exponent field, mantissa field. Works on jnp or numpy
  input; every step is exact.
  """
  y_hat = jnp.asarray(y_hat, jnp.float32)
  e_bits, m_bits, b0 = fmt.exponent_bits, fmt.mantissa_bits, fmt.natural_bias
  magnitude = jnp.abs(y_hat)
  k = _step_exponent(magnitude, fmt)                     # step exponent of its binade
  steps = (magnitude * _two_pow(-k)).astype(jnp.int32)   # integer multiple of the step, exact
  subnormal = k == (1 - b0 - m_bits)
  # Subnormal binade: value = m * step (m < 2^M, exponent field 0); normal: steps = 2^M + m.
  # The smallest normals share the subnormals' step, so "subnormal" is decided by steps < 2^M.
  subnormal = subnormal & (steps < (1 << m_bits))
  exponent_field = jnp.where(subnormal, 0, k + m_bits + b0)
  mantissa_field = jnp.where(subnormal, steps, steps - (1 << m_bits))
  if e_bits == 0:
    exponent_field = jnp.zeros_like(exponent_field)
    mantissa_field = steps
  code = (exponent_field << m_bits) | mantissa_field
  if fmt.signed:
    sign = jax.lax.bitcast_convert_type(y_hat, jnp.int32) < 0   # sign bit, -0.0 included
    code = code | (sign.astype(jnp.int32) << (e_bits + m_bits))
  return code
