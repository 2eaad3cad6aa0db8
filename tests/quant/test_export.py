"""Export codes and bit-packing.

Oracles: fake_quant itself (decode(encode(x)) must reproduce it bit for bit), ml_dtypes bit patterns for
the codes of formats it has, and numpy's unpackbits for the packed bit stream.
"""
import jax
import ml_dtypes
import numpy as np
import pytest

from msfp_jax.quant import export
from msfp_jax.quant.fake_quant import fake_quant
from msfp_jax.quant.formats import FPFormat

CASES = [
    # format, maxval, zero point
    (FPFormat(2, 1), 1.3, 0.0),
    (FPFormat(3, 0), 0.7, 0.0),
    (FPFormat(1, 2), 2.2, 0.0),
    (FPFormat(2, 2, signed=False), 1.9, -0.2785),
    (FPFormat(1, 3, signed=False), 3.1, -0.14),
    (FPFormat(0, 3), 1.1, 0.0),                      # INT4
    (FPFormat(0, 4, signed=False), 2.5, -0.6),       # uINT4, asymmetric
    (FPFormat(4, 3), 5.0, 0.0),
    (FPFormat(2, 3), 0.9, 0.0),                      # 6 bits
    (FPFormat(5, 6), 3.0, 0.0),                      # 12 bits: uint16 codes
]


def same_bits(a, b):
  """Bit-for-bit equal float32 arrays, except that -0.0 and +0.0 count as equal (XLA drops `+ 0.0`
  when the zero point is a compile-time constant, which keeps the sign of a zero)."""
  a = np.asarray(a, np.float32) + np.float32(0.0)   # -0.0 + 0.0 = +0.0 in numpy
  b = np.asarray(b, np.float32) + np.float32(0.0)
  return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("fmt,maxval,zero_point", CASES, ids=lambda v: str(v))
def test_decode_of_encode_is_fake_quant_bit_for_bit(fmt, maxval, zero_point):
  rng = np.random.default_rng(fmt.format_id)
  x = (rng.normal(size=(7, 5, 6)) * maxval).astype(np.float32)
  x[0, 0, :3] = [np.inf, -np.inf, 0.0]
  per_channel = (maxval * rng.uniform(0.5, 1.5, size=6)).astype(np.float32)
  for m in (np.float32(maxval), per_channel):
    expected = np.asarray(fake_quant(x, fmt, m, zero_point))
    expected_jit = np.asarray(jax.jit(fake_quant, static_argnums=1)(x, fmt, m, zero_point))
    codes = export.encode(x, fmt, m, zero_point)
    assert codes.dtype == (np.uint8 if fmt.bits <= 8 else np.uint16) and codes.shape == x.shape
    assert codes.max() < 2 ** fmt.bits
    assert same_bits(export.decode(codes, fmt, m, zero_point), expected)
    assert same_bits(expected_jit, expected)
    decoded_jit = jax.jit(export.decode_jnp, static_argnums=1)(codes, fmt, m, zero_point)
    assert same_bits(decoded_jit, expected)
    assert same_bits(export.decode_jnp(codes, fmt, m, zero_point), expected)


@pytest.mark.parametrize("e_bits,m_bits,dtype", [(2, 1, ml_dtypes.float4_e2m1fn),
                                                 (3, 2, ml_dtypes.float6_e3m2fn),
                                                 (4, 3, ml_dtypes.float8_e4m3fn)])
def test_codes_are_the_ml_dtypes_bit_patterns(e_bits, m_bits, dtype):
  fmt = FPFormat(e_bits, m_bits)
  rng = np.random.default_rng(0)
  top = min(fmt.natural_max, 448.0)
  x = rng.uniform(-top, top, size=3000).astype(np.float32)
  codes = export.encode(x, fmt, fmt.natural_max)
  np.testing.assert_array_equal(codes, x.astype(dtype).view(np.uint8))


@pytest.mark.parametrize("bits", [1, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("count", [1, 2, 7, 1001])
def test_pack_unpack_round_trip(bits, count):
  rng = np.random.default_rng(bits * 1000 + count)
  codes = rng.integers(0, 2 ** bits, size=count).astype(np.uint8)
  packed = export.pack_codes(codes, bits)
  assert packed.dtype == np.uint8 and packed.shape == (-(-count * bits // 8),)
  assert packed.size == export.packed_size(count, bits)
  # Independent reading of the bit stream: little-endian bits, code i at bits [i*bits, (i+1)*bits).
  stream = np.unpackbits(packed, bitorder="little")[:count * bits].reshape(count, bits)
  np.testing.assert_array_equal((stream.astype(np.int64) << np.arange(bits)).sum(axis=1), codes)
  np.testing.assert_array_equal(export.unpack_codes(packed, bits, count), codes)
  unpacked_jit = jax.jit(export.unpack_codes_jnp, static_argnums=(1, 2))(packed, bits, count)
  np.testing.assert_array_equal(np.asarray(unpacked_jit), codes)


def test_two_four_bit_codes_per_byte_low_nibble_first():
  packed = export.pack_codes(np.array([[0x1, 0x2], [0xF, 0x0]], np.uint8), 4)
  assert packed.tolist() == [0x21, 0x0F]


def test_packed_weights_decode_inside_jit():
  """The path a packed-file sampler takes: unpack + decode traced together, per-channel maxval."""
  fmt = FPFormat(2, 1)
  rng = np.random.default_rng(5)
  kernel = rng.normal(size=(3, 3, 4, 8)).astype(np.float32)
  maxval = np.abs(kernel).max(axis=(0, 1, 2)).astype(np.float32)
  packed = export.pack_codes(export.encode(kernel, fmt, maxval), fmt.bits)
  assert packed.size == kernel.size // 2

  @jax.jit
  def restore(packed, maxval):
    codes = export.unpack_codes_jnp(packed, 4, kernel.size).reshape(kernel.shape)
    return export.decode_jnp(codes, fmt, maxval)
  assert same_bits(restore(packed, maxval), fake_quant(kernel, fmt, maxval))


def test_bad_input_raises():
  fmt = FPFormat(2, 1)
  with pytest.raises(ValueError, match="NaN"):
    export.encode(np.array([1.0, np.nan]), fmt, 1.0)
  with pytest.raises(ValueError, match="maxval must be positive"):
    export.encode(np.ones(3), fmt, 0.0)
  with pytest.raises(ValueError, match="codes must be in 0..15"):
    export.decode(np.array([16]), fmt, 1.0)
  with pytest.raises(ValueError, match="codes must be in 0..7 for 3 bits"):
    export.pack_codes(np.array([8]), 3)
  with pytest.raises(ValueError, match="bits must be an int in 1..8"):
    export.pack_codes(np.array([1]), 9)
  with pytest.raises(ValueError, match="need a 1-D array of at least 3 bytes"):
    export.unpack_codes(np.zeros(2, np.uint8), 4, 5)
