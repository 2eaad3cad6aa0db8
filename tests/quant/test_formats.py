"""FP formats and rounding against independent oracles (style.md anchor 4, after aqt's fp_numerics_test).

Oracles: ml_dtypes casts on numpy (float32 -> low-precision dtype -> float32, ties to even), every bit
pattern of a format decoded by a small decoder written here with math.ldexp, and a brute-force
nearest-grid-value search in float64.
"""
import math

import jax
import ml_dtypes
import numpy as np
import pytest

from msfp_jax.quant.fake_quant import fake_quant
from msfp_jax.quant.formats import FPFormat, candidates
from msfp_jax.quant.numerics import fp_round, natural_codes

ML_DTYPES = {
    (2, 1): ml_dtypes.float4_e2m1fn,
    (2, 3): ml_dtypes.float6_e2m3fn,
    (3, 2): ml_dtypes.float6_e3m2fn,
    (4, 3): ml_dtypes.float8_e4m3fn,
}


def ml_dtypes_values(dtype, bits):
  """Value of every bit pattern of an ml_dtypes type (float64; NaN codes stay NaN)."""
  return np.arange(2 ** bits, dtype=np.uint8).view(dtype).astype(np.float64)


def decode_bits(code: int, e_bits: int, m_bits: int, signed: bool, bias: float) -> float:
  """Independent decoder of one bit pattern: sign | exponent | mantissa, all codes finite."""
  mantissa = code % (1 << m_bits)
  exponent = (code >> m_bits) % (1 << e_bits) if e_bits else 0
  if exponent == 0:
    magnitude = math.ldexp(mantissa / (1 << m_bits), 1) * 2.0 ** -bias
  else:
    magnitude = (1 + mantissa / (1 << m_bits)) * 2.0 ** (exponent - bias)
  negative = signed and (code >> (e_bits + m_bits)) & 1
  return -magnitude if negative else magnitude


def probe_points(grid):
  """Grid values, midpoints, the float32 neighbours of each midpoint, and points beyond the ends."""
  grid32 = grid.astype(np.float32)
  mids = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)
  return np.concatenate([
      grid32, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
  ])


def nearest_even_oracle(points, e_bits, m_bits, signed):
  """Brute force in float64 over the decoded codes: the nearest value; at a tie between neighbours
  a < b, the one that is an even multiple of the local step b - a (method.md: step * round(x / step),
  half to even). For M >= 1 that is the code with even mantissa, as ml_dtypes rounds; for M = 0 it
  differs from bit-pattern parity (1.5 -> 2 in E3M0), and method.md's arithmetic definition wins.
  """
  fmt = FPFormat(e_bits, m_bits, signed)
  values = np.unique([decode_bits(c, e_bits, m_bits, signed, fmt.natural_bias)
                      for c in range(2 ** fmt.bits)])
  out = []
  for p in np.clip(points.astype(np.float64), values[0], values[-1]):
    hi_index = min(np.searchsorted(values, p), len(values) - 1)
    lo_index = hi_index if values[hi_index] == p else hi_index - 1
    lo, hi = values[lo_index], values[hi_index]
    if lo == hi or p - lo < hi - p:
      out.append(lo)
    elif p - lo > hi - p:
      out.append(hi)
    else:
      out.append(lo if round(lo / (hi - lo)) % 2 == 0 else hi)
  return np.array(out)


@pytest.mark.parametrize("e_bits,m_bits", [(2, 1), (2, 3), (3, 2), (4, 3)])
def test_every_code_decodes_like_ml_dtypes(e_bits, m_bits):
  fmt = FPFormat(e_bits, m_bits)
  ours = fmt.code_values()
  theirs = ml_dtypes_values(ML_DTYPES[(e_bits, m_bits)], fmt.bits)
  finite = np.isfinite(theirs)
  if (e_bits, m_bits) == (4, 3):
    # float8_e4m3fn spends 0x7F/0xFF on NaN; our all-finite E4M3 puts +-480 there.
    assert (~finite).sum() == 2 and np.all(np.abs(ours[~finite]) == 480.0)
  else:
    assert finite.all()
  np.testing.assert_array_equal(ours[finite], theirs[finite])
  np.testing.assert_array_equal(np.signbit(ours[finite]), np.signbit(theirs[finite]))  # -0 too
  # natural_codes inverts the decoding, bit for bit (including the negative-zero code).
  codes = np.asarray(natural_codes(ours.astype(np.float32), fmt))
  np.testing.assert_array_equal(codes, np.arange(2 ** fmt.bits))


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("e_bits,m_bits", [(2, 1), (2, 3), (3, 2), (4, 3)])
def test_rounding_matches_ml_dtypes_casts(e_bits, m_bits, use_jit):
  fmt = FPFormat(e_bits, m_bits)
  dtype = ML_DTYPES[(e_bits, m_bits)]
  grid = fmt.grid()
  if (e_bits, m_bits) == (4, 3):
    grid = grid[np.abs(grid) <= 448]       # where float8_e4m3fn agrees with the all-finite format
    points = probe_points(grid)
  else:
    beyond = np.array([1.0001, 1.5, 1e3, np.inf]) * fmt.natural_max
    points = np.concatenate([probe_points(grid), beyond, -beyond]).astype(np.float32)
  expected = points.astype(dtype).astype(np.float32)
  quantize = lambda x: fake_quant(x, fmt, fmt.natural_max)
  if use_jit:
    quantize = jax.jit(quantize)
  np.testing.assert_array_equal(np.asarray(quantize(points)), expected)
  np.testing.assert_array_equal(np.asarray(fp_round(points, fmt)), expected)


def test_grids_of_four_bit_formats_are_the_documented_ones():
  """The non-negative halves listed in method.md section 2."""
  def nonneg(fmt):
    grid = fmt.grid()
    return grid[grid >= 0].tolist()
  assert nonneg(FPFormat(2, 1)) == [0, .5, 1, 1.5, 2, 3, 4, 6]
  assert nonneg(FPFormat(3, 0)) == [0, .25, .5, 1, 2, 4, 8, 16]
  assert nonneg(FPFormat(1, 2)) == [0, .5, 1, 1.5, 2, 2.5, 3, 3.5]
  assert nonneg(FPFormat(2, 2, signed=False)) == [
      0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7]
  assert FPFormat(2, 2, signed=False).grid().size == 16
  # INT formats: integers.
  assert FPFormat(0, 3).grid().tolist() == list(range(-7, 8))
  assert FPFormat(0, 4, signed=False).grid().tolist() == list(range(16))


UNSIGNED = [(1, 3), (2, 2), (3, 1), (2, 3), (3, 2), (1, 1), (0, 4), (0, 2), (4, 4)]


@pytest.mark.parametrize("e_bits,m_bits", UNSIGNED)
def test_unsigned_formats_against_bit_decoder_and_signed_half(e_bits, m_bits):
  fmt = FPFormat(e_bits, m_bits, signed=False)
  decoded = np.array([decode_bits(c, e_bits, m_bits, False, fmt.natural_bias)
                      for c in range(2 ** fmt.bits)])
  np.testing.assert_array_equal(fmt.code_values(), decoded)
  grid = fmt.grid()
  assert grid[-1] == fmt.natural_max
  signed_grid = FPFormat(e_bits, m_bits, signed=True).grid()
  np.testing.assert_array_equal(grid, signed_grid[signed_grid >= 0])

  points = np.concatenate([probe_points(grid), [-1.0, -1e-3, 1.3 * fmt.natural_max, np.inf]])
  points = points.astype(np.float32)
  expected = nearest_even_oracle(points, e_bits, m_bits, signed=False)
  for quantize in (lambda x: fake_quant(x, fmt, fmt.natural_max),
                   jax.jit(lambda x: fake_quant(x, fmt, fmt.natural_max))):
    np.testing.assert_array_equal(np.asarray(quantize(points)).astype(np.float64), expected)
  # On non-negative inputs, unsigned rounding equals signed rounding of the same (E, M).
  nonneg = points[points >= 0]
  signed_fmt = FPFormat(e_bits, m_bits, signed=True)
  np.testing.assert_array_equal(np.asarray(fake_quant(nonneg, fmt, 3.0)),
                                np.asarray(fake_quant(nonneg, signed_fmt, 3.0)))


@pytest.mark.parametrize("e_bits,m_bits", [(1, 2), (3, 0), (0, 3), (5, 2), (2, 5)])
def test_other_signed_formats_against_brute_force(e_bits, m_bits):
  fmt = FPFormat(e_bits, m_bits)
  points = np.concatenate([probe_points(fmt.grid()), [7e3, -np.inf]]).astype(np.float32)
  expected = nearest_even_oracle(points, e_bits, m_bits, signed=True)
  np.testing.assert_array_equal(np.asarray(fake_quant(points, fmt, fmt.natural_max)), expected)


def test_shifted_unsigned_grid_with_zero_point():
  fmt = FPFormat(2, 2, signed=False)
  zero_point, maxval = -0.2785, 2.3
  rng = np.random.default_rng(0)
  x = rng.uniform(-1.0, 3.0, size=4000).astype(np.float32)
  out = np.asarray(fake_quant(x, fmt, maxval, zero_point)).astype(np.float64)
  levels = zero_point + fmt.grid(maxval)                  # the shifted grid, float64
  expected = levels[np.argmin(np.abs(np.clip(x, zero_point, zero_point + maxval)[:, None]
                                     - levels[None, :]), axis=1)]
  np.testing.assert_allclose(out, expected, rtol=0, atol=2e-6)
  assert out.min() >= zero_point - 1e-6 and np.isclose(out.min(), zero_point)
  assert np.isclose(out.max(), zero_point + maxval)
  # The grid is densest next to z: the first step above z is the smallest one.
  steps = np.diff(levels)
  assert np.isclose(steps[0], steps.min(), rtol=1e-9) and np.isclose(steps[-1], steps.max(), rtol=1e-9)
  assert steps[-1] > 3 * steps[0]


@pytest.mark.parametrize("fmt", [FPFormat(2, 1), FPFormat(3, 2), FPFormat(2, 2, False), FPFormat(0, 3)])
def test_grid_scales_with_maxval(fmt):
  rng = np.random.default_rng(1)
  maxval = 1.7
  x = rng.normal(size=2000).astype(np.float32) * 2
  for scale in (0.25, 8.0):  # powers of two: exact
    lhs = np.asarray(fake_quant(x, fmt, scale * maxval))
    rhs = scale * np.asarray(fake_quant(x / scale, fmt, maxval))
    np.testing.assert_array_equal(lhs, rhs)
  scale = 1.37
  lhs = np.asarray(fake_quant(x, fmt, scale * maxval))
  rhs = scale * np.asarray(fake_quant((x / scale).astype(np.float32), fmt, maxval))
  # Away from rounding ties the two agree to float32 precision.
  grid = fmt.grid(scale * maxval)
  mids = (grid[1:] + grid[:-1]) / 2
  far = np.min(np.abs(x[:, None] - mids[None, :]), axis=1) > 1e-4
  np.testing.assert_allclose(lhs[far], rhs[far], rtol=1e-6, atol=1e-7)
  # The grid for maxval is the natural grid scaled, and tops out at maxval.
  np.testing.assert_allclose(fmt.grid(maxval), fmt.grid() * maxval / fmt.natural_max, rtol=1e-12)
  assert math.isclose(fmt.grid(maxval)[-1], maxval, rel_tol=1e-12)


def test_fp_round_with_real_bias_matches_fake_quant_with_maxval():
  fmt = FPFormat(2, 1)
  maxval = 2.6
  bias = fmt.bias_for(maxval)
  x = np.linspace(-3, 3, 1001, dtype=np.float32)
  grid = fmt.grid(maxval)
  np.testing.assert_allclose(np.asarray(fp_round(x, fmt, bias)), np.asarray(fake_quant(x, fmt, maxval)),
                             rtol=1e-6)
  out = np.asarray(fake_quant(x, fmt, maxval)).astype(np.float64)
  assert np.abs(out[:, None] - grid[None, :]).min(axis=1).max() < 1e-6   # every output is on the grid


def test_natural_max_and_bias():
  assert FPFormat(2, 1).natural_max == 6.0
  assert FPFormat(2, 3).natural_max == 7.5
  assert FPFormat(3, 2).natural_max == 28.0
  assert FPFormat(4, 3).natural_max == 480.0
  assert FPFormat(0, 3).natural_max == 7.0
  assert FPFormat(0, 4, signed=False).natural_max == 15.0
  for fmt in (FPFormat(2, 1), FPFormat(3, 0), FPFormat(1, 2), FPFormat(2, 2, False), FPFormat(0, 3),
              FPFormat(0, 1, False), FPFormat(1, 0, False)):
    assert math.isclose(fmt.bias_for(fmt.natural_max), fmt.natural_bias, abs_tol=1e-12)
    for maxval in (0.01, 1.0, 37.5):
      # bias_for is consistent with the decoded grid (the independent decoder of this file).
      top = decode_bits(fmt.num_codes // (2 if fmt.signed else 1) - 1, fmt.exponent_bits,
                        fmt.mantissa_bits, fmt.signed, fmt.bias_for(maxval))
      assert math.isclose(top, maxval, rel_tol=1e-12)


def test_names_ids_and_candidates():
  assert FPFormat(2, 1).name == "E2M1" and FPFormat(2, 2, False).name == "uE2M2"
  assert FPFormat(0, 3).name == "INT4" and FPFormat(0, 4, False).name == "uINT4"
  assert FPFormat(2, 1).bits == 4 and FPFormat(2, 2, False).bits == 4 and FPFormat(0, 3).is_int
  assert FPFormat.from_name("E0M3") == FPFormat(0, 3)
  assert FPFormat.from_name("ue3m1") == FPFormat(3, 1, False)
  seen = set()
  for signed in (True, False):
    for e in range(0, 8):
      for m in range(0, 17):
        try:
          fmt = FPFormat(e, m, signed)
        except ValueError:
          continue
        assert FPFormat.from_name(fmt.name) == fmt
        assert FPFormat.from_id(fmt.format_id) == fmt
        seen.add(fmt.format_id)
        assert 0 <= fmt.format_id < 512
  assert len(seen) > 200  # distinct ids for every valid format
  assert candidates(4, True) == (FPFormat(1, 2), FPFormat(2, 1), FPFormat(3, 0))
  assert candidates(4, False) == (FPFormat(1, 3, False), FPFormat(2, 2, False), FPFormat(3, 1, False))
  assert FPFormat.candidates(6, True)[0] == FPFormat(1, 4)
  assert all(f.bits == 8 for f in candidates(8, False) + candidates(8, True))


@pytest.mark.parametrize("args,fragment", [
    ((-1, 2), "exponent_bits must be >= 0"),
    ((2, -1), "mantissa_bits must be >= 0"),
    ((8, 1), "exponent_bits must be at most 7"),
    ((5, 11), "at most 16 bits"),
    ((0, 0, False), "unsigned FPFormat needs at least one bit"),
    ((0, 0, True), "signed FPFormat needs at least one exponent or mantissa bit"),
    ((2.0, 1), "must be an int"),
])
def test_impossible_formats_raise(args, fragment):
  with pytest.raises(ValueError, match=fragment):
    FPFormat(*args)


def test_bad_names_and_candidates_raise():
  for name in ("E2", "fp4", "INT1", "uINT0", "E9M1"):
    with pytest.raises(ValueError):
      FPFormat.from_name(name)
  with pytest.raises(ValueError, match="at least 2 bits"):
    candidates(1, True)
  with pytest.raises(ValueError, match="positive"):
    FPFormat(2, 1).bias_for(0.0)
