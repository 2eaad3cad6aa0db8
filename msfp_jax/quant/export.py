"""Packed export of quantized tensors: codes, decoding, and bit-packing.

A quantized tensor is stored as the bit pattern ("code") of its natural-grid value plus the float32
maxval and zero point it was quantized with (per channel or per tensor) and the format's
``FPFormat.format_id``. Code layout: see ``msfp_jax.quant.formats`` (sign | exponent | mantissa, the same
as ml_dtypes' float4_e2m1fn etc. for signed formats).

``decode(encode(x, ...), ...)`` equals ``fake_quant(x, ...)`` bit for bit (up to the sign of zeros: XLA
drops an addition of a constant zero point 0.0, which keeps -0.0): both compute
z + y_hat * grid_scale(maxval) with the same float32 operations, where y_hat is the natural-grid value
and the product is exact (see fake_quant.grid_scale), so an FMA or not gives the same result.

Packing: code i occupies bits [i * bits, (i + 1) * bits) of a little-endian bit stream, so two 4-bit codes
share a byte (low nibble first) and n codes take ceil(n * bits / 8) bytes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax.quant.fake_quant import _check_concrete_maxval, as_format, grid_scale, grid_scale_numpy, quantize_shifted
from msfp_jax.quant.formats import FPFormat
from msfp_jax.quant.numerics import natural_codes

MAX_PACKED_BITS = 8


def _code_dtype(fmt: FPFormat):
  return np.uint8 if fmt.bits <= 8 else np.uint16


@functools.partial(jax.jit, static_argnums=(1,))
def _encode_jit(x, fmt: FPFormat, maxval, zero_point):
  y_hat, _ = quantize_shifted(x, fmt, maxval, zero_point)
  return natural_codes(y_hat, fmt)


def encode(x, fmt, maxval, zero_point=0.0) -> np.ndarray:
  """Codes (np.uint8; np.uint16 for formats over 8 bits) of the grid values ``fake_quant`` rounds x to.

  Shapes broadcast as in ``fake_quant``. Raises ValueError for NaN in x (codes have no NaN) or a
  maxval that is not positive and finite.
  """
  fmt = as_format(fmt)
  _check_concrete_maxval(maxval)
  x = np.asarray(x, dtype=np.float32)
  if np.isnan(x).any():
    raise ValueError(f"encode: x contains {int(np.isnan(x).sum())} NaN value(s); {fmt.name} codes "
                     "have no NaN, so a tensor with NaN cannot be exported (check the model weights)")
  codes = _encode_jit(x, fmt, np.asarray(maxval, np.float32), np.asarray(zero_point, np.float32))
  return np.asarray(codes).astype(_code_dtype(fmt))


def code_table(fmt) -> np.ndarray:
  """float32 natural-grid value of every code (exact: natural grids of <= 16 bits fit float32)."""
  fmt = as_format(fmt)
  return fmt.code_values().astype(np.float32)


def _check_codes(codes: np.ndarray, fmt: FPFormat) -> None:
  if codes.size and (codes.min() < 0 or codes.max() >= fmt.num_codes):
    raise ValueError(f"decode: codes must be in 0..{fmt.num_codes - 1} for {fmt.name}, got values in "
                     f"{codes.min()}..{codes.max()}")


def decode(codes, fmt, maxval, zero_point=0.0) -> np.ndarray:
  """numpy decoder: float32 values of ``codes``; equals fake_quant of the encoded tensor exactly."""
  fmt = as_format(fmt)
  _check_concrete_maxval(maxval)
  codes = np.asarray(codes)
  _check_codes(codes, fmt)
  y_hat = code_table(fmt)[codes.astype(np.int64)]
  scale = grid_scale_numpy(maxval, fmt)             # the same bits as fake_quant's scale
  return (y_hat * scale + np.asarray(zero_point, np.float32)).astype(np.float32)


def decode_jnp(codes, fmt, maxval, zero_point=0.0) -> jax.Array:
  """jnp decoder (traceable, e.g. inside a jitted sampler reading a packed file); same values as decode."""
  fmt = as_format(fmt)
  table = jnp.asarray(code_table(fmt))
  y_hat = jnp.take(table, jnp.asarray(codes).astype(jnp.int32), mode="clip")
  scale = grid_scale(maxval, fmt)
  return y_hat * scale + jnp.asarray(zero_point, jnp.float32)


def packed_size(count: int, bits: int) -> int:
  """Bytes needed for ``count`` codes of ``bits`` bits: ceil(count * bits / 8)."""
  return (int(count) * int(bits) + 7) // 8


def _check_bits(bits: int) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_PACKED_BITS:
    raise ValueError(f"bits must be an int in 1..{MAX_PACKED_BITS} for packing, got {bits!r}")
  return int(bits)


def pack_codes(codes, bits: int) -> np.ndarray:
  """Pack codes (any shape, flattened in C order) into a uint8 array of ceil(n * bits / 8) bytes."""
  bits = _check_bits(bits)
  flat = np.asarray(codes).reshape(-1)
  if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
    raise ValueError(f"pack_codes: codes must be in 0..{(1 << bits) - 1} for {bits} bits, got values "
                     f"in {flat.min()}..{flat.max()}")
  flat = flat.astype(np.uint8)
  if bits == 8:
    return flat.copy()
  if bits == 4:  # the common case, without the 8x bit matrix
    if flat.size % 2:
      flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
  bit_matrix = (flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(bit_matrix.reshape(-1), bitorder="little")


def _unpack(packed, bits: int, count: int, xp):
  """Shared by the numpy and jnp unpackers: a code spans at most two bytes since bits <= 8."""
  index = xp.arange(count, dtype=xp.int64 if xp is np else xp.int32)
  bit_position = index * bits
  byte = bit_position >> 3
  shift = (bit_position & 7).astype(xp.uint16)
  padded = xp.concatenate([packed.astype(xp.uint16), xp.zeros(1, xp.uint16)])
  word = padded[byte] | (padded[byte + 1] << 8)
  return ((word >> shift) & ((1 << bits) - 1)).astype(xp.uint8)


def _check_packed(packed, bits: int, count: int) -> None:
  if count < 0:
    raise ValueError(f"count must be >= 0, got {count}")
  needed = packed_size(count, bits)
  if packed.ndim != 1 or packed.shape[0] < needed:
    raise ValueError(f"unpack_codes: {count} codes of {bits} bits need a 1-D array of at least {needed} "
                     f"bytes, got shape {tuple(packed.shape)}")


def unpack_codes(packed, bits: int, count: int) -> np.ndarray:
  """Inverse of ``pack_codes``: the first ``count`` codes as a flat np.uint8 array."""
  bits = _check_bits(bits)
  packed = np.asarray(packed, np.uint8)
  _check_packed(packed, bits, int(count))
  return _unpack(packed, bits, int(count), np)


def unpack_codes_jnp(packed, bits: int, count: int) -> jax.Array:
  """jnp ``unpack_codes`` (traceable; ``bits`` and ``count`` are static)."""
  bits = _check_bits(bits)
  packed = jnp.asarray(packed, jnp.uint8)
  _check_packed(packed, bits, int(count))
  return _unpack(packed, bits, int(count), jnp)
