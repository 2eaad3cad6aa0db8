"""The JSON form of the frozen architecture configs of the latent-diffusion models (model_config.json)."""
from __future__ import annotations

import dataclasses
from typing import Any, Self


class JSONConfig:
  """`from_dict` / `to_dict` for a frozen dataclass of architecture fields: lists in JSON stand for tuples.

  A key that is no field is an error naming the known ones: a misspelt field of a model_config.json must not
  quietly build another architecture.
  """

  @classmethod
  def from_dict(cls, config: dict[str, Any]) -> Self:
    """From a JSON-style dict (lists for tuples); unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
      raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known: {sorted(names)}.")
    return cls(**config)

  def to_dict(self) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
