"""Which layers are quantized, at which bits: the config's QuantRules applied to the traced modules.

The rule itself (a regex over module paths and a tuple of module types) is msfp_jax.quant.config.QuantRule.
A module is addressed by `'/'.join(module.path)` (e.g. "down_0_block_1/conv1") and by the names of the
classes in its type's MRO (so a subclass of nn.Conv matches "Conv"). Rules are tried in order and the first
rule whose `path` regex fully matches and whose `module_types` contain one of the module's type names
decides; modules no rule matches are quantized at the config's bits when they are Conv or Dense (the
attention "MatMul" modules only when a rule names them). A rule that matches no module is an error: a typo
in a regex must not silently leave a layer at the wrong precision.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from msfp_jax.quant.config import DEFAULT_MODULE_TYPES, QuantConfig, RuleMatchError

# The attention matmul module (msfp_jax.models.attention.MatMul): two activation operands, no kernel.
MATMUL_TYPE = "MatMul"
# The marked concatenation (msfp_jax.models.layers.Concat, the UNets' [h, skip]): never quantized itself; a
# layer whose input is its output gets one activation quantizer per part (QuantConfig.split_shortcut).
CONCAT_TYPE = "Concat"


@dataclasses.dataclass(frozen=True)
class ModuleRecord:
  """A module call seen while tracing the model: what the rules are matched against."""

  path: str
  type_names: tuple[str, ...]  # class names of the module type's MRO, most derived first
  kernel_shape: tuple[int, ...] | None  # shape of params['kernel'], None when the module has none
  num_inputs: int  # positional array arguments of __call__
  # Channels of the first part when the first input is the output of a marked Concat (the rest is the second
  # part), else None.
  input_split: int | None = None

  @property
  def module_type(self) -> str:
    return self.type_names[0]


@dataclasses.dataclass(frozen=True)
class LayerInfo:
  """What the rules decided for one layer (discover_layers' answer; TALoRA builds banks from it)."""

  module_type: str  # the module's class name ("Conv", "Dense", "MatMul", ...)
  kernel_shape: tuple[int, ...] | None  # None for MatMul (no kernel)
  quantized: bool
  weight_bits: int | None  # None when not quantized or when the layer has no kernel
  act_bits: int | None  # None when not quantized
  sign_mode: str | None = None  # the activation sign mode in effect; None when not quantized
  is_matmul: bool = False  # True for the attention MatMul: two activation operands, no kernel
  # Shortcut splitting: the input's channels [:act_split] and [act_split:] (the two concatenated sources) get
  # one activation quantizer each; None: one quantizer for the whole input.
  act_split: int | None = None


def _candidate_types(config: QuantConfig) -> set[str]:
  types = set(DEFAULT_MODULE_TYPES) | {MATMUL_TYPE}
  for rule in config.rules:
    types.update(rule.module_types)
  return types


def _describe_modules(records: Mapping[str, ModuleRecord]) -> str:
  lines = [f"  {path or '<root>'} ({rec.module_type})" for path, rec in records.items()]
  return "\n".join(lines) if lines else "  (no module calls were seen)"


def resolve_layers(records: Mapping[str, ModuleRecord], config: QuantConfig) -> dict[str, LayerInfo]:
  """Applies config.rules to the traced modules; returns LayerInfo for every candidate layer.

  Candidates are modules whose type is Conv, Dense, MatMul or named by a rule. Raises RuleMatchError when a
  rule matches no module, or when a rule selects a non-MatMul module that has no 'kernel' parameter.
  """
  candidate_types = _candidate_types(config)
  used = [False] * len(config.rules)
  layers: dict[str, LayerInfo] = {}
  for path, rec in records.items():
    if not candidate_types.intersection(rec.type_names):
      continue
    is_matmul = MATMUL_TYPE in rec.type_names
    rule_index = next((i for i, r in enumerate(config.rules) if r.matches(path, rec.type_names)), None)
    if rule_index is None:
      rule = None
      quantized = bool(set(DEFAULT_MODULE_TYPES).intersection(rec.type_names)) and not is_matmul
    else:
      used[rule_index] = True
      rule = config.rules[rule_index]
      quantized = not rule.keep_fp
    if quantized and not is_matmul and rec.kernel_shape is None:
      raise RuleMatchError(
          f"Module {path!r} ({rec.module_type}) is selected for quantization but has no 'kernel' parameter; "
          "only modules with a kernel (Conv, Dense, ...) or the attention MatMul can be quantized. Narrow the "
          "rule's path or module_types.")
    if not quantized:
      layers[path] = LayerInfo(module_type=rec.module_type, kernel_shape=rec.kernel_shape, quantized=False,
                               weight_bits=None, act_bits=None, is_matmul=is_matmul)
      continue
    weight_bits = (rule.weight_bits if rule and rule.weight_bits is not None else config.weight_bits)
    act_bits = rule.act_bits if rule and rule.act_bits is not None else config.act_bits
    sign_mode = rule.sign_mode if rule and rule.sign_mode is not None else config.sign_mode
    split = rule.split_shortcut if rule and rule.split_shortcut is not None else config.split_shortcut
    layers[path] = LayerInfo(module_type=rec.module_type, kernel_shape=rec.kernel_shape, quantized=True,
                             weight_bits=None if is_matmul else weight_bits, act_bits=act_bits,
                             sign_mode=sign_mode, is_matmul=is_matmul,
                             act_split=rec.input_split if split and not is_matmul else None)
  unused = [rule for rule, u in zip(config.rules, used) if not u]
  if unused:
    described = "; ".join(f"QuantRule(path={r.path!r}, module_types={r.module_types!r})" for r in unused)
    raise RuleMatchError(
        f"{len(unused)} quantization rule(s) match no module: {described}. A rule matches when its path regex "
        "fully matches a '/'-joined module path and one of its module_types is the module's type (or a base "
        f"class). Module paths in this model:\n{_describe_modules(records)}")
  return layers
