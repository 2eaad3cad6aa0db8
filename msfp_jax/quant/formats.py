"""Floating-point quantization formats (method.md section 2).

A format is (E exponent bits, M mantissa bits, signed or not). Every code is finite, as in the OCP
"fn" formats (no Inf/NaN codes), so the top exponent holds ordinary numbers. With a real-valued
exponent bias b the representable magnitudes are

  normal (e = 1 .. 2^E - 1):   2^(e - b) * (1 + m / 2^M)
  subnormal (e = 0):           2^(1 - b) * m / 2^M,            m = 0 .. 2^M - 1.

A user thinks in the largest value ``maxval``; the bias follows from it (``FPFormat.bias_for``).

Code layout (used by ``grid``/``code_values`` and by the packed export): signed formats put the sign
in the most significant bit, then the exponent, then the mantissa (sign-magnitude, as ml_dtypes'
float4_e2m1fn / float6_* / float8_e4m3fn); unsigned formats have no sign bit.

Formats with E = 0 have subnormals only: a uniform integer grid. Their natural bias is 1 - M, which makes
the natural grid the integers 0 .. 2^M - 1. They are named "INT<bits>" (signed, sign-magnitude, so a
symmetric grid with 2^bits - 1 levels) and "uINT<bits>" (unsigned, 2^bits levels; with a zero point
this is the usual asymmetric INT quantizer). "E0M3" and "uE0M4" are accepted as aliases by
``FPFormat.from_name``.
"""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

# Fake quantization computes in float32 on the format's natural grid; with an 8-bit exponent and all
# codes finite the natural grid would exceed float32's range (its top exponent is reserved for Inf).
MAX_EXPONENT_BITS = 7
MAX_TOTAL_BITS = 16

_NAME_RE = re.compile(r"^(?P<unsigned>u?)(?:E(?P<e>\d+)M(?P<m>\d+)|INT(?P<int_bits>\d+))$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class FPFormat:
  """A floating-point (or, with E = 0, integer) quantization format.

  Attributes:
    exponent_bits: E, 0 .. 7. E = 0 gives a uniform (INT) grid.
    mantissa_bits: M, >= 0.
    signed: True for a sign bit (symmetric grid), False for a non-negative grid, used with a zero point.
  """
  exponent_bits: int
  mantissa_bits: int
  signed: bool = True

  def __post_init__(self):
    e, m = self.exponent_bits, self.mantissa_bits
    for field, value in (("exponent_bits", e), ("mantissa_bits", m)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"FPFormat.{field} must be an int, got {value!r}")
      if value < 0:
        raise ValueError(f"FPFormat.{field} must be >= 0, got {value}")
    if not isinstance(self.signed, (bool, np.bool_)):
      raise ValueError(f"FPFormat.signed must be a bool, got {self.signed!r}")
    if e > MAX_EXPONENT_BITS:
      raise ValueError(
          f"FPFormat.exponent_bits must be at most {MAX_EXPONENT_BITS}, got {e}: fake quantization "
          "computes in float32, and a grid with more exponent bits and all codes finite exceeds its range")
    bits = e + m + (1 if self.signed else 0)
    if bits > MAX_TOTAL_BITS:
      raise ValueError(f"FPFormat must have at most {MAX_TOTAL_BITS} bits in total, got {bits} "
                       f"(E={e}, M={m}, signed={self.signed})")
    if self.signed and e + m == 0:
      raise ValueError("a signed FPFormat needs at least one exponent or mantissa bit besides the sign "
                       "(E0M0 can only represent 0)")
    if not self.signed and e + m == 0:
      raise ValueError("an unsigned FPFormat needs at least one bit (E + M >= 1)")
    # Normalize numpy ints/bools so that equality and hashing are plain-Python.
    object.__setattr__(self, "exponent_bits", int(e))
    object.__setattr__(self, "mantissa_bits", int(m))
    object.__setattr__(self, "signed", bool(self.signed))

  # ---------------------------------------------------------------- basic properties
  @property
  def bits(self) -> int:
    """Total bit count: E + M + 1 when signed, E + M when unsigned."""
    return self.exponent_bits + self.mantissa_bits + (1 if self.signed else 0)

  @property
  def is_int(self) -> bool:
    """True for E = 0: a uniform integer grid."""
    return self.exponent_bits == 0

  @property
  def name(self) -> str:
    """"E2M1", "uE2M2"; E = 0 formats are "INT4" (signed E0M3) / "uINT4" (unsigned E0M4)."""
    prefix = "" if self.signed else "u"
    if self.is_int:
      return f"{prefix}INT{self.bits}"
    return f"{prefix}E{self.exponent_bits}M{self.mantissa_bits}"

  def __str__(self) -> str:
    return self.name

  @property
  def natural_bias(self) -> int:
    """The integer bias of the format's natural grid: 2^(E-1) - 1 (IEEE convention); 1 - M for E = 0."""
    if self.is_int:
      return 1 - self.mantissa_bits
    return 2 ** (self.exponent_bits - 1) - 1

  @property
  def max_exponent(self) -> int:
    """Largest biased exponent field value (2^E - 1; all codes finite). 0 for INT formats."""
    return 2 ** self.exponent_bits - 1

  @property
  def natural_max(self) -> float:
    """Largest value of the grid with the natural bias, e.g. E2M1 6.0, E2M3 7.5, E3M2 28.0, E4M3 480.0.

    All codes are finite, so E4M3 reaches 480 (float8_e4m3fn spends its top code on NaN and stops at
    448). For E = 0 it is 2^M - 1 (the largest integer of the grid).
    """
    return self._max_for_bias(self.natural_bias)

  def _max_for_bias(self, bias: float) -> float:
    m = self.mantissa_bits
    if self.is_int:
      return 2.0 ** (1 - bias) * (1.0 - 2.0 ** -m)
    return (2.0 - 2.0 ** -m) * 2.0 ** (self.max_exponent - bias)

  def bias_for(self, maxval: float) -> float:
    """The real-valued exponent bias whose grid tops out at ``maxval``.

    b = 2^E - 1 - log2(maxval) + log2(2 - 2^-M) for E >= 1. For E = 0 (no normal numbers) the largest
    value is the largest subnormal 2^(1-b) (1 - 2^-M), so b = 1 - log2(maxval) + log2(1 - 2^-M).
    """
    maxval = float(maxval)
    if not (maxval > 0 and math.isfinite(maxval)):
      raise ValueError(f"maxval must be positive and finite, got {maxval}")
    m = self.mantissa_bits
    if self.is_int:
      return 1.0 - math.log2(maxval) + math.log2(1.0 - 2.0 ** -m)
    return self.max_exponent - math.log2(maxval) + math.log2(2.0 - 2.0 ** -m)

  # ---------------------------------------------------------------- enumeration of codes
  @property
  def num_codes(self) -> int:
    return 2 ** self.bits

  def code_values(self, maxval: float | None = None) -> np.ndarray:
    """The value of every code 0 .. 2^bits - 1 (float64), decoded from its bit pattern.

    Written independently of the rounding arithmetic in ``numerics``: it decodes sign, exponent and
    mantissa fields with the real-valued bias ``bias_for(maxval)`` (natural bias when maxval is None).
    Negative zero (sign bit set, rest zero) decodes to -0.0.
    """
    e_bits, m_bits = self.exponent_bits, self.mantissa_bits
    bias = self.natural_bias if maxval is None else self.bias_for(maxval)
    codes = np.arange(self.num_codes, dtype=np.int64)
    mantissa = codes & ((1 << m_bits) - 1)
    exponent = (codes >> m_bits) & ((1 << e_bits) - 1)
    frac = mantissa.astype(np.float64) / 2.0 ** m_bits
    magnitude = np.where(exponent == 0,
                         2.0 ** (1.0 - bias) * frac,
                         2.0 ** (exponent.astype(np.float64) - bias) * (1.0 + frac))
    if self.signed:
      sign_bit = (codes >> (e_bits + m_bits)) & 1
      return np.where(sign_bit == 1, -magnitude, magnitude)
    return magnitude

  def grid(self, maxval: float | None = None) -> np.ndarray:
    """All distinct representable values, sorted ascending, float64 (natural grid when maxval is None)."""
    values = self.code_values(maxval)
    return np.unique(values + 0.0)  # + 0.0 folds -0.0 into 0.0

  # ---------------------------------------------------------------- ids and names
  @property
  def format_id(self) -> int:
    """A stable small integer for exported files: (unsigned << 8) | (E << 5) | M, in 0 .. 511."""
    return (0 if self.signed else 1) << 8 | self.exponent_bits << 5 | self.mantissa_bits

  @classmethod
  def from_id(cls, format_id: int) -> FPFormat:
    """Inverse of ``format_id``."""
    format_id = int(format_id)
    if not 0 <= format_id < 512:
      raise ValueError(f"format id must be in 0..511, got {format_id}")
    return cls(exponent_bits=(format_id >> 5) & 7, mantissa_bits=format_id & 31,
               signed=not (format_id >> 8) & 1)

  @classmethod
  def from_name(cls, name: str) -> FPFormat:
    """Parse "E2M1", "uE2M2", "INT4", "uINT4", "E0M3" (case-insensitive in E/M/INT)."""
    if isinstance(name, FPFormat):
      return name
    match = _NAME_RE.match(str(name).strip())
    if match is None:
      raise ValueError(f"cannot parse FP format name {name!r}: expected e.g. 'E2M1', 'uE2M2', 'INT4' "
                       "or 'uINT4' (a leading 'u' means unsigned)")
    signed = match.group("unsigned") == ""
    if match.group("int_bits") is not None:
      bits = int(match.group("int_bits"))
      if bits < (2 if signed else 1):
        raise ValueError(f"{name!r}: a {'signed' if signed else 'unsigned'} INT format needs at least "
                         f"{2 if signed else 1} bits")
      return cls(0, bits - 1 if signed else bits, signed)
    return cls(int(match.group("e")), int(match.group("m")), signed)


def candidates(bits: int, signed: bool) -> tuple[FPFormat, ...]:
  """The formats the calibration search tries at ``bits`` bits (method.md section 3), ascending E.

  Signed: E = 1 .. bits - 1 with M = bits - 1 - E (4 bits: E1M2, E2M1, E3M0). Unsigned: E = 1 .. bits - 1
  with M = bits - E (4 bits: E1M3, E2M2, E3M1). Exponents are capped at MAX_EXPONENT_BITS.
  (method.md's prose says "signed E in 1..n-2" but lists E3M0 among the 4-bit signed candidates; we follow
  the listed formats.)
  """
  bits = int(bits)
  if signed and bits < 2:
    raise ValueError(f"signed FP candidates need at least 2 bits (sign + 1), got {bits}")
  if not signed and bits < 2:
    raise ValueError(f"unsigned FP candidates need at least 2 bits, got {bits}")
  if bits > MAX_TOTAL_BITS:
    raise ValueError(f"at most {MAX_TOTAL_BITS} bits, got {bits}")
  top = min(bits - 1, MAX_EXPONENT_BITS)
  if signed:
    return tuple(FPFormat(e, bits - 1 - e, True) for e in range(1, top + 1))
  return tuple(FPFormat(e, bits - e, False) for e in range(1, top + 1))


FPFormat.candidates = staticmethod(candidates)  # also reachable as FPFormat.candidates(bits, signed)
