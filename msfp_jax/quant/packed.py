"""A quantized model as one packed file: n-bit codes per quantized kernel, everything else in float32.

Layout (one .npz, readable with numpy alone). A few large entries rather than one per array: a zip + .npy
header costs ~250 bytes an entry, which for a model of many narrow layers outweighs its biases. Entries are
deflated (np.savez_compressed): FP codes are far from uniformly distributed and the JSON repeats its keys, which
takes the built-in model's one-bank file from 0.158x to 0.136x of the FP checkpoint.
  "metadata.json"   uint8 bytes of a JSON document: format version, the quantization state's metadata
                    (formats, paths), per quantized layer its kernel shape, bits and byte range in the
                    code blobs, per float32 array its name, offset and shape, the number of weight sets
                    ("banks"), and the caller's metadata
  "codes/bank<k>"   uint8: the packed codes of every quantized kernel of weight set k, layer after layer
                    (two 4-bit codes per byte, packed per layer, so each layer starts on a byte); one set
                    per TALoRA bank (1 for plain PTQ), all with the same layout
  "float32"         float32: every parameter that is not a quantized kernel (biases, norms, layers the rules
                    keep in full precision; shared by all banks), then the QuantState arrays (per-channel
                    weight maxvals and zero points, activation maxvals and zero points)
  "other/<path>"    parameters that are not floats (if any), as they are
  "extra/<name>"    arrays the caller adds (e.g. the router's bank per timestep)

`decode(encode(x))` equals `fake_quant(x)` bit for bit, so the kernels `load_packed` decodes are exactly
the fake-quantized kernels and a model run from the packed file computes what the fake-quantized one does.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from msfp_jax.quant import export
from msfp_jax.quant.state import QuantState

PACKED_FORMAT_VERSION = 2


class PackedModelError(ValueError):
  """A packed model file is missing, corrupt, or inconsistent with what the caller passes."""


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], np.ndarray]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (str(key),)))
    else:
      flat[prefix + (str(key),)] = np.asarray(value)
  return flat


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _kernel_path(layer_path: str, collection: str = "params") -> tuple[str, ...]:
  return (collection, *layer_path.split("/"), "kernel")


def _concat(pieces: Sequence[np.ndarray], dtype) -> np.ndarray:
  return np.concatenate([p.reshape(-1) for p in pieces]) if pieces else np.zeros(0, dtype)


@dataclasses.dataclass(frozen=True)
class PackedModel:
  """What `load_packed` returns: one decoded variables tree per bank, the quantization state, extras."""
  variables_per_bank: list[dict]
  qstate: QuantState
  extra: dict[str, np.ndarray]
  metadata: dict


def export_packed(path: str | os.PathLike, variables_per_bank: Sequence[Mapping[str, Any]], qstate: QuantState, *,
                  metadata: Mapping[str, Any] | None = None,
                  extra_arrays: Mapping[str, np.ndarray] | None = None) -> dict[str, int]:
  """Writes the packed file; returns sizes in bytes {"file", "float32_equivalent", "codes", "float"}.

  `variables_per_bank[k]` holds the float kernels of weight set k before weight quantization (for TALoRA:
  W + B_k A_k); all banks must agree on every other parameter. "float32_equivalent" is the size of the
  same parameters stored as float32, the reference the packed size is compared with.
  """
  if not variables_per_bank:
    raise PackedModelError("export_packed needs at least one weight set (variables_per_bank is empty).")
  flats = [_flatten(jax.tree.map(np.asarray, dict(v))) for v in variables_per_bank]
  quantized = {p: layer for p, layer in qstate.layers.items() if layer.weight_format is not None}
  state_dict = qstate.to_dict()
  arrays: dict[str, np.ndarray] = {}
  layer_meta = {}
  bank_codes: list[list[np.ndarray]] = [[] for _ in flats]
  offset = 0
  for layer_path, layer in quantized.items():
    kernel_key = _kernel_path(layer_path)
    if kernel_key not in flats[0]:
      raise PackedModelError(f"The quantization state has layer {layer_path!r}, but the variables have no "
                             f"kernel at {'/'.join(kernel_key)}: state and model do not belong together.")
    shape = flats[0][kernel_key].shape
    zero_point = 0.0 if layer.weight_zero_point is None else np.asarray(layer.weight_zero_point)
    for k, flat in enumerate(flats):
      codes = export.encode(flat[kernel_key], layer.weight_format, np.asarray(layer.weight_maxval), zero_point)
      bank_codes[k].append(export.pack_codes(codes, layer.weight_format.bits))
    nbytes = bank_codes[0][-1].nbytes
    layer_meta[layer_path] = {"shape": list(shape), "bits": layer.weight_format.bits,
                              "format_id": layer.weight_format.format_id, "offset": offset, "nbytes": nbytes}
    offset += nbytes
  for k, pieces in enumerate(bank_codes):
    arrays[f"codes/bank{k}"] = _concat(pieces, np.uint8)
  quantized_keys = {_kernel_path(p) for p in quantized}
  floats, other = [], []
  float_index: dict[str, list] = {"params": [], "quant": []}  # [name, offset, shape]: lists keep the JSON short
  float_size = [0]  # running offset into the float32 blob

  def add_float(kind: str, name: str, value: np.ndarray) -> None:
    float_index[kind].append([name, float_size[0], list(np.shape(value))])
    floats.append(np.asarray(value, np.float32))
    float_size[0] += floats[-1].size

  for key, value in flats[0].items():
    if key in quantized_keys:
      continue
    for k, flat in enumerate(flats[1:], start=1):
      if key not in flat or not np.array_equal(flat[key], value):
        raise PackedModelError(f"Weight set {k} differs from set 0 at {'/'.join(key)}, which is not a quantized "
                               "kernel: banks may only differ in quantized kernels.")
    if value.dtype.kind == "f":
      add_float("params", "/".join(key), value)
    else:
      other.append("/".join(key))
      arrays["other/" + other[-1]] = value
  for layer_key, leaves in state_dict["arrays"].items():
    for field, value in leaves.items():
      add_float("quant", f"{layer_key}/{field}", value)
  arrays["float32"] = _concat(floats, np.float32)
  for name, value in (extra_arrays or {}).items():
    arrays[f"extra/{name}"] = np.asarray(value)
  document = {"version": PACKED_FORMAT_VERSION, "num_banks": len(flats), "quant_state": state_dict["metadata"],
              "layers": layer_meta, "float32": float_index, "other": other, "metadata": dict(metadata or {})}
  arrays["metadata.json"] = np.frombuffer(json.dumps(document, separators=(",", ":")).encode(), np.uint8)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:  # np.savez_* on a file object keeps the exact name (no ".npz" appended)
    np.savez_compressed(f, **arrays)
  os.replace(tmp, path)
  float32_equivalent = sum(int(np.prod(v.shape)) * 4 for v in flats[0].values())
  float_bytes = arrays["float32"].nbytes + sum(arrays["other/" + name].nbytes for name in other)
  return {"file": path.stat().st_size, "float32_equivalent": float32_equivalent,
          "codes": sum(arrays[f"codes/bank{k}"].nbytes for k in range(len(flats))), "float": float_bytes}


def load_packed(path: str | os.PathLike) -> PackedModel:
  """Reads a file written by `export_packed`, decoding every bank's kernels to float32."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise PackedModelError(f"No packed model at {path}; write one with `python -m msfp_jax.main --mode=export`.")
  try:
    with np.load(path, allow_pickle=False) as archive:
      arrays = {name: archive[name] for name in archive.files}
  except Exception as e:  # zipfile, ValueError, OSError: the caller needs one error.
    raise PackedModelError(f"{path} is not a packed msfp_jax model: {e}") from e
  if "metadata.json" not in arrays:
    raise PackedModelError(f"{path} has no metadata.json entry: not a packed msfp_jax model.")
  document = json.loads(arrays.pop("metadata.json").tobytes().decode())
  if document.get("version") != PACKED_FORMAT_VERSION:
    raise PackedModelError(f"{path}: packed format version {document.get('version')} is not supported "
                           f"(this msfp_jax reads version {PACKED_FORMAT_VERSION}).")
  missing = [name for name in ("float32", *(f"codes/bank{k}" for k in range(document["num_banks"])),
                                *("other/" + name for name in document["other"])) if name not in arrays]
  if missing:
    raise PackedModelError(f"{path} lacks the entries {missing}: the file is truncated or not written by "
                           "export_packed.")
  blob = arrays["float32"]
  quant_arrays: dict[str, dict[str, np.ndarray]] = {}
  float_flat = {tuple(name.split("/")): arrays["other/" + name] for name in document["other"]}
  for kind, entries in document["float32"].items():
    for name, offset, shape in entries:
      value = blob[offset:offset + int(np.prod(shape))].reshape(shape)
      if kind == "params":
        float_flat[tuple(name.split("/"))] = value
      else:
        layer_key, _, field = name.partition("/")
        quant_arrays.setdefault(layer_key, {})[field] = value
  extra = {name.partition("/")[2]: value for name, value in arrays.items() if name.startswith("extra/")}
  qstate = QuantState.from_dict({"metadata": document["quant_state"], "arrays": quant_arrays})
  variables_per_bank = []
  for k in range(document["num_banks"]):
    codes_blob = arrays[f"codes/bank{k}"]
    flat = dict(float_flat)
    for layer_path, info in document["layers"].items():
      layer = qstate.layers[layer_path]
      packed = codes_blob[info["offset"]:info["offset"] + info["nbytes"]]
      codes = export.unpack_codes(packed, info["bits"], int(np.prod(info["shape"]))).reshape(info["shape"])
      zero_point = 0.0 if layer.weight_zero_point is None else np.asarray(layer.weight_zero_point)
      flat[_kernel_path(layer_path)] = export.decode(codes, layer.weight_format, np.asarray(layer.weight_maxval),
                                                     zero_point)
    variables_per_bank.append(_unflatten(flat))
  return PackedModel(variables_per_bank=variables_per_bank, qstate=qstate, extra=extra,
                     metadata=document["metadata"])
