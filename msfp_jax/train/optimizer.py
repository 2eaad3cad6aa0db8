"""AdamW with parameter groups (method.md section 7).

The trainable tree is {"banks": LoRA banks, "router": router params, "quant": QuantState}. Every leaf gets a
group label:

  lora          LoRA factors A, B
  router        the timestep router
  weight_scale  weight maxvals and zero points of the quantizers (EfficientDM: about 1e-6)
  act_quant     activation maxvals and zero points (EfficientDM: about 5e-4)
  frozen        everything else (e.g. calibration statistics a QuantState may carry): never updated

Each group has its own learning rate under one shared schedule (linear warmup, then linear decay to
end_factor * lr), built with optax.multi_transform.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import optax

GROUPS = ("lora", "router", "weight_scale", "act_quant")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
  learning_rates: Mapping[str, float]   # group -> peak learning rate (a group at 0 is frozen).
  num_steps: int                        # decay horizon: the schedule reaches end_factor * lr here.
  warmup_steps: int = 0
  end_factor: float = 0.0               # linear decay to end_factor * lr.
  weight_decay: float = 0.0             # AdamW decoupled weight decay (LoRA factors only).
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip_norm: float = 0.0           # 0 disables global-norm clipping.

  def __post_init__(self):
    unknown = sorted(set(self.learning_rates) - set(GROUPS))
    if unknown:
      raise ValueError(f"Unknown parameter groups {unknown} in the learning rates; the groups are {GROUPS}.")
    missing = sorted(set(GROUPS) - set(self.learning_rates))
    if missing:
      raise ValueError(f"Learning rates missing for groups {missing}; set finetune.lr.<group> for each of {GROUPS}.")
    if any(v < 0 for v in self.learning_rates.values()):
      raise ValueError(f"Learning rates must be >= 0; got {dict(self.learning_rates)}.")
    if self.num_steps < 1:
      raise ValueError(f"num_steps must be >= 1; got {self.num_steps}.")


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def quant_leaf_group(path_names: tuple[str, ...]) -> str:
  """Group of a QuantState leaf from its field names: weight_* / act_* maxvals and zero points."""
  for name in reversed(path_names):
    if not name.endswith(("maxval", "zero_point")):
      continue
    if name.startswith("weight_"):
      return "weight_scale"
    # rhs_act_*: the second operand of an attention matmul; skip_act_*: the skip part of a split input.
    if name.startswith(("act_", "rhs_act_", "skip_act_")):
      return "act_quant"
  return "frozen"


def param_groups(params: Mapping[str, Any]) -> Any:
  """A tree of group labels with the structure of `params` ({"banks", "router", "quant"})."""
  def label(path, leaf):
    del leaf
    names = tuple(_key_name(k) for k in path)
    top = names[0]
    if top == "banks":
      return "lora"
    if top == "router":
      return "router"
    if top == "quant":
      return quant_leaf_group(names[1:])
    raise ValueError(f"Unexpected trainable subtree {top!r}; expected 'banks', 'router' or 'quant'.")
  return jax.tree_util.tree_map_with_path(label, params)


def learning_rate_schedule(peak: float, config: OptimizerConfig) -> optax.Schedule:
  """Linear warmup to `peak`, then linear decay to end_factor * peak at num_steps (constant after)."""
  decay_steps = max(config.num_steps - config.warmup_steps, 1)
  decay = optax.linear_schedule(peak, peak * config.end_factor, decay_steps)
  if config.warmup_steps <= 0:
    return decay
  warmup = optax.linear_schedule(0.0, peak, config.warmup_steps)
  return optax.join_schedules([warmup, decay], [config.warmup_steps])


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
  """optax.multi_transform of one AdamW per group (+ set_to_zero for frozen leaves)."""
  transforms: dict[str, optax.GradientTransformation] = {"frozen": optax.set_to_zero()}
  for group in GROUPS:
    lr = float(config.learning_rates[group])
    if lr == 0.0:
      transforms[group] = optax.set_to_zero()
      continue
    transforms[group] = optax.adamw(learning_rate_schedule(lr, config), b1=config.b1, b2=config.b2,
                                    eps=config.eps, weight_decay=config.weight_decay if group == "lora" else 0.0)
  tx = optax.multi_transform(transforms, param_groups)
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
