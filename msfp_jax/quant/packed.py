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

For every quantized Conv/Dense whose input has a zero point z (unsigned activations), the float32 blob also
holds what an integer kernel needs to compute on codes: per bank the folded bias b + sum W_q z (W x_hat + b =
W q + (b + W z) with q = x_hat - z), and the q value of the code it pads with (the level nearest real 0;
exactly -z when the zero point is on the grid). `code_domain_apply` runs a model that way.

`decode(encode(x))` equals `fake_quant(x)` bit for bit, so the kernels `load_packed` decodes are exactly
the fake-quantized kernels and a model run from the packed file computes what the fake-quantized one does.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np

from msfp_jax.quant import export
from msfp_jax.quant.fake_quant import grid_scale_numpy
from msfp_jax.quant.interceptor import CodeDomainLayer, quantization_interceptor
from msfp_jax.quant.state import LayerQuantState, QuantState

PACKED_FORMAT_VERSION = 3
_READABLE_VERSIONS = (2, 3)  # 2: written before the code-domain entries existed


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


def _kernel_path(layer_path: str, collection: str = "params") -> tuple[str, ...]:
  return (collection, *layer_path.split("/"), "kernel")


def _concat(pieces: Sequence[np.ndarray], dtype) -> np.ndarray:
  return np.concatenate([p.reshape(-1) for p in pieces]) if pieces else np.zeros(0, dtype)


@dataclasses.dataclass(frozen=True)
class PackedModel:
  """What `load_packed` returns: one decoded variables tree per bank, the quantization state, extras, and
  per bank the code-domain form of the layers whose inputs have zero points (empty for version-2 files)."""
  variables_per_bank: list[dict]
  qstate: QuantState
  extra: dict[str, np.ndarray]
  metadata: dict
  code_domain_per_bank: list[dict[str, CodeDomainLayer]] = dataclasses.field(default_factory=list)


def _has_zero_point(layer: LayerQuantState) -> bool:
  return layer.weight_format is not None and (layer.act_zero_point is not None
                                              or layer.skip_act_zero_point is not None)


def _parts(layer: LayerQuantState) -> list[tuple[slice, str]]:
  """The input channels of each activation quantizer of a Conv/Dense layer, with its field prefix."""
  if layer.act_split is None:
    return [(slice(None), "act")]
  return [(slice(0, layer.act_split), "act"), (slice(layer.act_split, None), "skip_act")]


def _pad_values(layer: LayerQuantState) -> np.ndarray:
  """Per activation quantizer: the q value (x_hat - z) of the level nearest real 0, what a kernel pads with."""
  pads = []
  for _, field in _parts(layer):
    zero_point = getattr(layer, f"{field}_zero_point")
    if zero_point is None:
      pads.append(0.0)  # signed: q = x_hat, and real 0 is a code
      continue
    fmt, maxval = getattr(layer, f"{field}_format"), np.float32(getattr(layer, f"{field}_maxval"))
    scale = grid_scale_numpy(maxval, fmt)
    natural = fmt.grid()
    level = natural[np.argmin(np.abs(natural - (-float(zero_point) / float(scale))))]
    pads.append(np.float32(level) * scale)
  return np.asarray(pads, np.float32)


def _per_channel(layer: LayerQuantState, per_part: np.ndarray, channels: int) -> np.ndarray:
  out = np.zeros(channels, np.float32)
  for (channels_of_part, _), value in zip(_parts(layer), per_part):
    out[channels_of_part] = value
  return out


def _input_zero_points(layer: LayerQuantState, channels: int) -> np.ndarray:
  zero_points = [0.0 if getattr(layer, f"{field}_zero_point") is None else float(getattr(layer, f"{field}_zero_point"))
                 for _, field in _parts(layer)]
  return _per_channel(layer, np.asarray(zero_points, np.float32), channels)


def folded_bias(kernel_q: np.ndarray, bias: np.ndarray | None, input_zero_points: np.ndarray) -> np.ndarray:
  """b + sum over the kernel's taps and inputs of W_q[..., i, o] * z_i (kernel [..., in, out], Flax layout).

  A grouped conv's kernel has in/groups input rows; its zero points must then be one value (not split).
  """
  kernel_q = np.asarray(kernel_q, np.float64)
  fan_in = kernel_q.shape[-2]
  z = np.asarray(input_zero_points, np.float64)
  if fan_in != z.size:
    if np.ptp(z) > 0:
      raise PackedModelError(f"a kernel with {fan_in} input rows cannot fold {z.size} different per-channel "
                             "zero points (a grouped conv with a split input)")
    z = np.full(fan_in, z[0])
  fold = (kernel_q * z[:, None]).reshape(-1, kernel_q.shape[-1]).sum(axis=0)
  return (fold + (0.0 if bias is None else np.asarray(bias, np.float64))).astype(np.float32)


def code_domain_apply(model, packed: PackedModel, *args, bank: int = 0, **kwargs):
  """`model.apply` of the packed model's bank as an integer kernel computes it: each layer with an input
  zero point runs on codes (q = x_hat - z), pads with the code of real 0 and adds the folded bias.

  Equals the fake-quantized model (up to float summation order) exactly when every zero point is on the
  grid; the difference otherwise is what zero padding costs a kernel whose grid has no 0. Traceable.
  """
  if not packed.code_domain_per_bank:
    raise PackedModelError("this packed file has no code-domain entries (format version 2); re-export it")
  with quantization_interceptor(packed.qstate, weights_prequantized=True,
                                code_domain=packed.code_domain_per_bank[bank]):
    return model.apply(packed.variables_per_bank[bank], *args, **kwargs)


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
  float_index["code_domain"] = []
  for layer_path, layer in quantized.items():
    if not _has_zero_point(layer):
      continue
    kernel_key = _kernel_path(layer_path)
    z = _input_zero_points(layer, flats[0][kernel_key].shape[-2])
    add_float("code_domain", f"{layer_path}/pad_value", _pad_values(layer))  # one per quantizer: 1 or 2 floats
    bias = flats[0].get(kernel_key[:-1] + ("bias",))
    zero_point = 0.0 if layer.weight_zero_point is None else np.asarray(layer.weight_zero_point)
    for k, flat in enumerate(flats):
      kernel_q = export.decode(export.encode(flat[kernel_key], layer.weight_format, np.asarray(layer.weight_maxval),
                                             zero_point), layer.weight_format, np.asarray(layer.weight_maxval),
                               zero_point)
      add_float("code_domain", f"{layer_path}/folded_bias/bank{k}", folded_bias(kernel_q, bias, z))
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
  if document.get("version") not in _READABLE_VERSIONS:
    raise PackedModelError(f"{path}: packed format version {document.get('version')} is not supported "
                           f"(this msfp_jax reads version {PACKED_FORMAT_VERSION}).")
  missing = [name for name in ("float32", *(f"codes/bank{k}" for k in range(document["num_banks"])),
                                *("other/" + name for name in document["other"])) if name not in arrays]
  if missing:
    raise PackedModelError(f"{path} lacks the entries {missing}: the file is truncated or not written by "
                           "export_packed.")
  blob = arrays["float32"]
  quant_arrays: dict[str, dict[str, np.ndarray]] = {}
  code_domain: dict[str, dict[str, np.ndarray]] = {}
  float_flat = {tuple(name.split("/")): arrays["other/" + name] for name in document["other"]}
  for kind, entries in document["float32"].items():
    for name, offset, shape in entries:
      value = blob[offset:offset + int(np.prod(shape))].reshape(shape)
      if kind == "params":
        float_flat[tuple(name.split("/"))] = value
      elif kind == "code_domain":  # "<path>/pad_value" or "<path>/folded_bias/bank<k>"
        if name.endswith("/pad_value"):
          layer_path, key = name[:-len("/pad_value")], "pad_value"
        else:
          layer_path, _, key = name.rpartition("/folded_bias/")
        code_domain.setdefault(layer_path, {})[key] = value
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
    variables_per_bank.append(flax.traverse_util.unflatten_dict(flat))
  code_domain_per_bank = [
      {path: CodeDomainLayer(folded_bias=entry[f"bank{k}"],
                             pad_value=_per_channel(qstate.layers[path], entry["pad_value"],
                                                    document["layers"][path]["shape"][-2]))
       for path, entry in code_domain.items()} for k in range(document["num_banks"])
  ] if document["version"] >= 3 else []
  return PackedModel(variables_per_bank=variables_per_bank, qstate=qstate, extra=extra,
                     metadata=document["metadata"], code_domain_per_bank=code_domain_per_bank)
