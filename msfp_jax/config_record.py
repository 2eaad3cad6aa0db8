"""The config a job records beside its results, and which of its fields a rerun may change.

Three jobs refuse to go on from results of another config, each naming the fields that differ:

  * the main job (msfp_jax.run): its workdir's config.json (msfp_jax.run.workdir),
  * fine-tuning (msfp_jax.train.finetune): the config saved with each of its checkpoints,
  * FP training (msfp_jax.train_fp): the same, for its own checkpoints.

The ablation (msfp_jax.run.ablation) instead recomputes a row whose recorded config differs (ABLATION_ROW).

They record `json_config(config)`, compare with `differences` and differ only in what a rerun may change
(`Changeable`, one per job below, side by side). The module imports nothing of msfp_jax, so that msfp_jax.train
and msfp_jax.run can both use it (train knows nothing of run).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

ABSENT = "<absent>"  # what a difference shows for a field one of the two configs lacks
# How a difference is named: fine-tuning and the main job name the recorded side "checkpoint"; FP training uses
# the arrow (`describe`'s default).
CHECKPOINT_VS_NOW = "{field}: checkpoint {saved!r} vs now {current!r}"


def json_normalized(value: Any) -> Any:
  """`value` as it comes back from JSON (tuples and sets as lists, other objects as their str), so that a
  recorded config and the current one compare equal."""
  return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, (tuple, set)) else str(o)))


def json_config(config) -> dict:
  """The config (a ConfigDict or a dict) as it is recorded: JSON-normalized nested dicts."""
  return json_normalized(config.to_dict() if hasattr(config, "to_dict") else dict(config))


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Nested dicts as one dict of dotted names ({"a": {"b": 1}} -> {"a.b": 1})."""
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  flat: dict[str, Any] = {}
  for key, value in tree.items():
    flat.update(flatten(value, f"{prefix}{key}."))
  return flat


@dataclasses.dataclass(frozen=True, kw_only=True)
class Changeable:
  """The fields of a recorded config that a rerun may change: these exact dotted names, and every field under
  these prefixes (a prefix ends with ".")."""
  fields: tuple[str, ...] = ()
  prefixes: tuple[str, ...] = ()

  def __contains__(self, field: str) -> bool:
    return field in self.fields or field.startswith(self.prefixes)


# Fine-tuning, resumed from its checkpoint: the step budget and bookkeeping, and sections fine-tuning never reads
# (evaluation) or that only say how the work is spread over devices (mesh, distributed). Everything else shapes
# the trained parameters: a resumed run with another learning rate would end elsewhere than an uninterrupted one.
FINETUNE_CHECKPOINT = Changeable(
    fields=("finetune.num_steps", "finetune.checkpoint_every", "finetune.log_every", "finetune.max_checkpoints",
            "finetune.divergence_factor"),
    prefixes=("evaluation.", "distributed.", "mesh."))

# The main job's workdir: what fine-tuning may change, and the budgets of the stages after it (sample, and the
# ablation table, whose variants are workdirs of their own). The sample, eval and export results record their
# own inputs (msfp_jax.stage_inputs) and are computed again when those change, so their fields may change here.
MAIN_JOB_WORKDIR = Changeable(fields=FINETUNE_CHECKPOINT.fields,
                              prefixes=(*FINETUNE_CHECKPOINT.prefixes, "sample.", "ablation."))

# One row of the ablation table (msfp_jax.run.ablation), kept while it was computed from the same variant config:
# fine-tuning's bookkeeping, and how the work is spread over devices. Every other field, evaluation's included,
# shapes the row's numbers.
ABLATION_ROW = Changeable(
    fields=("finetune.checkpoint_every", "finetune.log_every", "finetune.max_checkpoints",
            "finetune.divergence_factor"),
    prefixes=("distributed.", "mesh."))

# FP training, resumed from its checkpoint: the step budget, bookkeeping and the time limit; where its data lives
# (the data's hash is checked when it loads); where the model is exported and how the final samples are drawn;
# and the warm start (it applies to a workdir without checkpoints only). The batch of step s is a function of
# (seed, s), so anything else (model, schedule, optimizer, batch size) would make a resumed run another run.
TRAIN_FP_CHECKPOINT = Changeable(
    fields=("train.num_steps", "train.log_every", "train.checkpoint_every", "train.stop_after_seconds",
            "train.init_from", "train.divergence_factor", "data.data_dir", "data.archive", "data.source",
            "export_dir"),
    prefixes=("sample.",))


@dataclasses.dataclass(frozen=True)
class Difference:
  """A field whose recorded and current values differ (ABSENT where a config lacks it)."""
  field: str
  saved: Any
  current: Any


def kept_fields(record: dict, changeable: Changeable) -> dict[str, Any]:
  """The flattened fields of a recorded (json_config) config that a rerun must keep."""
  return {k: v for k, v in flatten(json_normalized(record)).items() if k not in changeable}


def differences(saved: dict, current: dict, changeable: Changeable) -> list[Difference]:
  """The fields (sorted) outside `changeable` that differ between two recorded configs."""
  a, b = kept_fields(saved, changeable), kept_fields(current, changeable)
  return [Difference(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
          if a.get(k, ABSENT) != b.get(k, ABSENT)]


def describe(diffs: list[Difference], template: str = "{field}: {saved!r} -> {current!r}") -> str:
  """The differences as one line, "; "-separated; `template` formats each (field, saved, current)."""
  return "; ".join(template.format(field=d.field, saved=d.saved, current=d.current) for d in diffs)
