"""The calibrated quantization state: a pytree whose leaves are the trainable quantizer parameters.

Arrays (maxvals and zero points) are leaves, so optax can train them and orbax can save them; formats, bit
counts, module types and the calibration diagnostics are static aux data (part of the tree structure, so a
jitted function taking a QuantState retraces when a format changes, never when a maxval changes).

Zero points exist only for unsigned formats (unsigned FP activations, asymmetric INT); a signed quantizer
has `zero_point=None`, which is an empty subtree.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax.quant.config import QuantStateMismatchError
from msfp_jax.quant.formats import FPFormat

_STATE_FORMAT_VERSION = 1
# The quantizers a layer can have, as field-name prefixes of LayerQuantState.
_QUANTIZERS = ("act", "weight", "rhs_act", "skip_act")


def _static(default=dataclasses.MISSING):
  if default is dataclasses.MISSING:
    return flax.struct.field(pytree_node=False)
  return flax.struct.field(pytree_node=False, default=default)


@flax.struct.dataclass(kw_only=True)
class LayerQuantState:
  """Quantizers of one layer: its weight (per output channel) and its input activation (per tensor).

  For the attention MatMul (no kernel) the weight fields are None and `rhs_act_*` quantize the second
  operand. With shortcut splitting (`act_split` set) `act_*` quantize the input's channels [:act_split] (the
  running features) and `skip_act_*` the channels [act_split:] (the skip). `*_mse` are the quantization MSEs
  measured by the calibration search (not updated by training).
  """

  module_type: str = _static()
  act_format: FPFormat = _static()
  act_maxval: jax.Array  # [] float32
  act_zero_point: jax.Array | None = None  # [] float32 for unsigned formats, else None
  weight_format: FPFormat | None = _static(None)
  weight_maxval: jax.Array | None = None  # [out channels] float32 (last kernel axis)
  weight_zero_point: jax.Array | None = None  # [out channels] for unsigned (INT) weight formats, else None
  rhs_act_format: FPFormat | None = _static(None)
  rhs_act_maxval: jax.Array | None = None
  rhs_act_zero_point: jax.Array | None = None
  act_split: int | None = _static(None)
  skip_act_format: FPFormat | None = _static(None)
  skip_act_maxval: jax.Array | None = None
  skip_act_zero_point: jax.Array | None = None
  skip_one_sided: bool = _static(False)
  skip_act_range: tuple[float, float] = _static((0.0, 0.0))
  skip_act_mse: float | None = _static(None)
  one_sided: bool = _static(False)  # the input was detected one-sided (an "AAL", method.md section 3)
  act_range: tuple[float, float] = _static((0.0, 0.0))  # observed (min, max) of the input at calibration
  act_mse: float | None = _static(None)
  weight_mse: float | None = _static(None)
  rhs_act_mse: float | None = _static(None)

  @property
  def is_matmul(self) -> bool:
    return self.weight_format is None


@flax.struct.dataclass(kw_only=True)
class QuantState:
  """Calibrated quantizers of a model, keyed by '/'-joined module path.

  `unquantized` lists the candidate layers the rules kept in full precision, so that the interceptor can tell
  a layer left in FP on purpose from a layer this state was not calibrated for.
  """

  layers: dict[str, LayerQuantState]
  kind: str = _static("fp")
  unquantized: tuple[str, ...] = _static(())

  # ------------------------------------------------------------------ checkpointing
  def to_dict(self) -> dict[str, Any]:
    """{"metadata": JSON-able description, "arrays": {layer_key: {field: np.ndarray}}}.

    Layers are stored under index keys ("layer_0000", ...) because module paths contain '/', which orbax
    would treat as directories; the metadata maps each key to its path.
    """
    meta_layers, arrays = [], {}
    for i, (path, layer) in enumerate(self.layers.items()):
      key = f"layer_{i:04d}"
      meta = {"key": key, "path": path, "module_type": layer.module_type, "one_sided": layer.one_sided,
              "act_range": list(layer.act_range)}
      if layer.act_split is not None:
        meta.update(act_split=layer.act_split, skip_one_sided=layer.skip_one_sided,
                    skip_act_range=list(layer.skip_act_range))
      leaves = {}
      for field in _QUANTIZERS:
        fmt = getattr(layer, f"{field}_format")
        meta[f"{field}_format"] = None if fmt is None else fmt.name
        meta[f"{field}_mse"] = getattr(layer, f"{field}_mse")
        for suffix in ("maxval", "zero_point"):
          value = getattr(layer, f"{field}_{suffix}")
          if value is not None:
            leaves[f"{field}_{suffix}"] = np.asarray(value, np.float32)
      meta_layers.append(meta)
      arrays[key] = leaves
    metadata = {"version": _STATE_FORMAT_VERSION, "kind": self.kind, "unquantized": list(self.unquantized),
                "layers": meta_layers}
    return {"metadata": metadata, "arrays": arrays}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> QuantState:
    """Inverse of to_dict (arrays become jnp float32 arrays)."""
    metadata, arrays = d["metadata"], d["arrays"]
    if metadata.get("version") != _STATE_FORMAT_VERSION:
      raise QuantStateMismatchError(
          f"quantization state version {metadata.get('version')!r} is not supported (expected "
          f"{_STATE_FORMAT_VERSION})")
    layers = {}
    for meta in metadata["layers"]:
      leaves = arrays.get(meta["key"])
      if leaves is None:
        raise QuantStateMismatchError(f"quantization state arrays lack {meta['key']} (layer {meta['path']!r})")
      kwargs = {}
      if meta.get("act_split") is not None:
        kwargs.update(act_split=int(meta["act_split"]), skip_one_sided=bool(meta["skip_one_sided"]),
                      skip_act_range=tuple(float(v) for v in meta["skip_act_range"]))
      for field in _QUANTIZERS:
        name = meta.get(f"{field}_format")  # states written before shortcut splitting have no skip_act_*
        kwargs[f"{field}_format"] = None if name is None else FPFormat.from_name(name)
        kwargs[f"{field}_mse"] = meta.get(f"{field}_mse")
        for suffix in ("maxval", "zero_point"):
          value = leaves.get(f"{field}_{suffix}")
          kwargs[f"{field}_{suffix}"] = None if value is None else jnp.asarray(value, jnp.float32)
      layers[meta["path"]] = LayerQuantState(
          module_type=meta["module_type"], one_sided=bool(meta["one_sided"]),
          act_range=tuple(float(v) for v in meta["act_range"]), **kwargs)
    return cls(layers=layers, kind=metadata["kind"], unquantized=tuple(metadata["unquantized"]))


def save_quant_state(directory: str | os.PathLike, qstate: QuantState) -> None:
  """Writes DIRECTORY/quant_state.json (metadata) and DIRECTORY/arrays (orbax, via msfp_jax.checkpoint)."""
  from msfp_jax import checkpoint  # pylint: disable=g-import-not-at-top  (imports orbax: only when saving)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  d = qstate.to_dict()
  checkpoint.save_json(directory / "quant_state.json", d["metadata"])
  checkpoint.save_tree(directory / "arrays", d["arrays"])


def load_quant_state(directory: str | os.PathLike) -> QuantState:
  """Reads a state written by save_quant_state."""
  from msfp_jax import checkpoint  # pylint: disable=g-import-not-at-top  (imports orbax: only when loading)
  directory = pathlib.Path(directory)
  meta_path = directory / "quant_state.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"{meta_path} not found: not a directory written by save_quant_state")
  metadata = checkpoint.load_json(meta_path)
  arrays = checkpoint.load_tree(directory / "arrays")
  return QuantState.from_dict({"metadata": metadata, "arrays": arrays})


def quant_state_json(qstate: QuantState) -> str:
  """The metadata of `qstate` as a JSON string (for logs)."""
  return json.dumps(qstate.to_dict()["metadata"], indent=1)
