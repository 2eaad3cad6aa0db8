"""Quantization configuration: the QuantConfig, its per-layer QuantRule, and the errors of the package.

Every choice method.md marks as "our choice" is a field here, so a user who has the paper's exact value can
set it. The rule lives beside the config that holds it (as qwix's qconfig.py keeps its rules), so the config
can check its rules without importing the module that applies them (msfp_jax.quant.rules).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping


class QuantizationError(ValueError):
  """Base class of the quantization package's errors (a ValueError: each one is bad input)."""


class InvalidQuantConfigError(QuantizationError):
  """A QuantConfig or QuantRule field has an impossible value."""


class RuleMatchError(QuantizationError):
  """A rule matches no module of the model (its message lists the module paths that exist)."""


class CalibrationError(QuantizationError):
  """Calibration cannot proceed: no batches, NaN/Inf in a layer's input, nothing to quantize."""


class QuantStateMismatchError(QuantizationError):
  """A QuantState does not fit the model or variables it is used with."""


KINDS = ("fp", "int")
SIGN_MODES = ("search", "signed", "unsigned")
# Module types quantized when no rule says otherwise (weights and input activation).
DEFAULT_MODULE_TYPES = ("Conv", "Dense")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
  """One layer-selection rule; the first rule that matches a module decides for it."""

  # Regular expression that must fully match the module path ('/'-joined Flax module names).
  path: str = ".*"
  # Module type names the rule applies to (matched against every class name in the module type's MRO).
  # Add "MatMul" (path e.g. ".*_matmul") to quantize the attention matmuls, which are off by default.
  module_types: tuple[str, ...] = DEFAULT_MODULE_TYPES
  # Bits of the weight quantizer for the matched layers; None: QuantConfig.weight_bits.
  weight_bits: int | None = None
  # Bits of the activation quantizer(s) for the matched layers; None: QuantConfig.act_bits.
  act_bits: int | None = None
  # True: the matched layers stay in full precision (neither weights nor inputs are quantized).
  keep_fp: bool = False
  # Overrides QuantConfig.sign_mode for the matched layers' activations; None: the config's mode.
  sign_mode: str | None = None
  # Overrides QuantConfig.split_shortcut for the matched layers (those whose input is a marked concatenation);
  # None: the config's choice.
  split_shortcut: bool | None = None

  def __post_init__(self):
    if isinstance(self.module_types, str):
      object.__setattr__(self, "module_types", (self.module_types,))
    object.__setattr__(self, "module_types", tuple(self.module_types))
    problems = []
    try:
      re.compile(self.path)
    except re.error as e:
      problems.append(f"path {self.path!r} is not a valid regular expression ({e})")
    if not self.module_types or not all(isinstance(t, str) and t for t in self.module_types):
      problems.append(f"module_types must be a non-empty tuple of type names, got {self.module_types!r}")
    for name in ("weight_bits", "act_bits"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 16):
        problems.append(f"{name} must be None or an integer in 2..16, got {value!r}")
    if self.sign_mode is not None and self.sign_mode not in SIGN_MODES:
      problems.append(f"sign_mode must be None or one of {SIGN_MODES}, got {self.sign_mode!r}")
    if self.split_shortcut is not None and not isinstance(self.split_shortcut, bool):
      problems.append(f"split_shortcut must be None, True or False, got {self.split_shortcut!r}")
    if problems:
      raise InvalidQuantConfigError(f"Invalid QuantRule(path={self.path!r}): " + "; ".join(problems) + ".")

  def matches(self, path: str, type_names: tuple[str, ...]) -> bool:
    return re.fullmatch(self.path, path) is not None and any(t in type_names for t in self.module_types)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["module_types"] = list(self.module_types)
    return d

  @classmethod
  def from_dict(cls, d: Mapping) -> QuantRule:
    d = dict(d)
    if "module_types" in d:
      d["module_types"] = tuple(d["module_types"])
    return cls(**d)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantConfig:
  """What to quantize and how to search each quantizer (method.md section 3).

  With no rules every nn.Conv and nn.Dense (weights and input activation) is quantized at
  weight_bits / act_bits; rules (msfp_jax.quant.QuantRule) change bits per layer, keep layers in full
  precision, or enable the attention matmuls.
  """

  # Bit width of weight quantizers (per output channel).
  weight_bits: int = 4
  # Bit width of activation quantizers (one per layer input tensor).
  act_bits: int = 4
  # "fp": the FP formats of method.md; "int": uniform asymmetric INT at the same bit counts (weights per
  # channel, activations per tensor, both with a zero point) through the same search, for side-by-side
  # comparisons.
  kind: str = "fp"
  # "search": one-sided layer inputs try signed and unsigned + zero point and keep the lower MSE, others are
  # signed; "signed": every activation signed (the paper's baseline); "unsigned": every one-sided input
  # unsigned + zero point without comparing. Ignored for kind="int" (always asymmetric).
  sign_mode: str = "search"
  # Layer selection and per-layer options, first match wins (see QuantRule).
  rules: tuple[QuantRule, ...] = ()
  # Shortcut splitting (Q-Diffusion): a layer whose input is a concatenation the model marks (a `Concat`
  # module: the UNet up-blocks' [h, skip]) quantizes each part with its own activation quantizer (own format
  # search and sign mode); its weights are quantized as usual. False: one quantizer over the whole input.
  split_shortcut: bool = True
  # Unsigned (and INT) activation zero points are searched among values that put real 0 on the grid (z = -a
  # grid level), so that 0, a conv's zero padding included, quantizes to exactly 0 and a kernel working on
  # codes can pad with the code of 0. False: z anywhere in [min, 0] (real 0 then becomes z + Q(-z)).
  zero_point_on_grid: bool = True
  # Our choice: an input is one-sided ("anomalous", e.g. SiLU-fed) when max > 0 and min > -alpha * max.
  one_sided_alpha: float = 0.5
  # Our choice: maxval candidates are c * absmax for `maxval_grid_size` values of c spread linearly over
  # [maxval_grid_min, maxval_grid_max] (per output channel for weights, per tensor for activations).
  maxval_grid_size: int = 100
  maxval_grid_min: float = 0.05
  maxval_grid_max: float = 1.2
  # Our choice: zero points of unsigned (and INT) activation quantizers are searched over this many values
  # spread linearly from the observed minimum to 0 (both ends included).
  zero_point_grid_size: int = 17
  # Bound on the calibration memory: each layer input keeps a uniform reservoir of at most this many values
  # (float32) over all batches; the search measures the MSE on it.
  samples_per_layer: int = 65536
  # Values drawn (uniformly, with replacement) from one layer input per batch; an input with at most this
  # many values contributes all of them.
  samples_per_batch: int = 4096
  # Seed of the calibration subsampling (device draws and the host reservoir).
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "rules", tuple(self.rules))
    problems = []
    for name in ("weight_bits", "act_bits"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 16:
        problems.append(f"{name} must be an integer in 2..16, got {value!r}")
    if self.kind not in KINDS:
      problems.append(f"kind must be one of {KINDS}, got {self.kind!r}")
    if self.sign_mode not in SIGN_MODES:
      problems.append(f"sign_mode must be one of {SIGN_MODES}, got {self.sign_mode!r}")
    for name in ("split_shortcut", "zero_point_on_grid"):
      if not isinstance(getattr(self, name), bool):
        problems.append(f"{name} must be True or False, got {getattr(self, name)!r}")
    if not self.one_sided_alpha > 0:
      problems.append(f"one_sided_alpha must be > 0, got {self.one_sided_alpha!r}")
    if not 0 < self.maxval_grid_min <= self.maxval_grid_max:
      problems.append("need 0 < maxval_grid_min <= maxval_grid_max, got "
                      f"{self.maxval_grid_min!r}, {self.maxval_grid_max!r}")
    for name in ("maxval_grid_size", "zero_point_grid_size", "samples_per_layer", "samples_per_batch"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{name} must be a positive integer, got {value!r}")
    for i, rule in enumerate(self.rules):
      if not isinstance(rule, QuantRule):
        problems.append(f"rules[{i}] must be a QuantRule, got {type(rule).__name__}")
    if problems:
      raise InvalidQuantConfigError("Invalid QuantConfig: " + "; ".join(problems) + ".")

  def to_dict(self) -> dict:
    """JSON-able form (rules as dicts)."""
    d = dataclasses.asdict(self)
    d["rules"] = [rule.to_dict() for rule in self.rules]
    return d

  @classmethod
  def from_dict(cls, d: dict) -> QuantConfig:
    """Inverse of to_dict."""
    d = dict(d)
    d["rules"] = tuple(QuantRule.from_dict(r) for r in d.get("rules", ()))
    return cls(**d)
