"""Key matching and torch -> Flax layout rules shared by the checkpoint converters.

A converter names, for every Flax module that owns parameters, the PyTorch module it comes from; everything
else (leaf names, layouts, the bookkeeping of missing / unexpected / mis-shaped keys) is here, so every
converter fails the same way: one `ConversionError` listing every problem at once, and no parameter is ever
left at its random initialization.

Layout rules (docs/checkpoints.md): Conv2d weight [O,I,kh,kw] -> kernel [kh,kw,I,O]; Linear [O,I] -> [I,O];
a 1x1 Conv2d [O,I,1,1] or Conv1d [O,I,1] feeding a Dense -> [I,O]; GroupNorm/LayerNorm weight -> scale;
Embedding weight -> embedding (unchanged).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import numpy as np
import yaml

from msfp_jax import checkpoint
from msfp_jax.models.tree_check import SEPARATOR as _SEPARATOR
from msfp_jax.models.tree_check import ConversionError, raise_on_tree_mismatch  # noqa: F401  (re-exported)

# Flax leaf name -> PyTorch parameter name.
_TORCH_LEAF_NAME = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}

# Keys that carry no parameters and are dropped silently.
IGNORED_KEY_SUFFIXES = ("num_batches_tracked",)


def torch_to_flax_array(leaf_name: str, array: np.ndarray, expected_ndim: int) -> np.ndarray:
  """Rearranges one PyTorch tensor into the layout of the Flax leaf `leaf_name` (kernel/scale/bias/embedding)."""
  a = np.asarray(array)
  if leaf_name == "kernel":
    if expected_ndim == 4 and a.ndim == 4:  # Conv2d
      return a.transpose(2, 3, 1, 0)
    if expected_ndim == 2:
      if a.ndim == 4 and a.shape[2:] == (1, 1):  # 1x1 Conv2d used as Dense
        a = a[:, :, 0, 0]
      elif a.ndim == 3 and a.shape[2] == 1:  # Conv1d(k=1)
        a = a[:, :, 0]
      if a.ndim == 2:  # Linear
        return a.T
  return a


def read_yaml(path: str | os.PathLike, *, what: str, syntax: str = "YAML") -> Any:
  """The parsed YAML (or JSON) file `path`: FileNotFoundError calling it `what` when it is absent,
  ConversionError when it does not parse as `syntax`."""
  return checkpoint.parse_file(path, yaml.safe_load, yaml.YAMLError, syntax=syntax, error=ConversionError,
                               missing=lambda p: FileNotFoundError(f"{what} {p} does not exist."))


def strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  """Removes `prefix` from the keys when every key carries it (DataParallel's 'module.')."""
  if state_dict and all(k.startswith(prefix) for k in state_dict):
    return {k[len(prefix):]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _flat_leaves(tree: Any) -> dict[tuple[str, ...], Any]:
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    flat[tuple(getattr(p, "key", getattr(p, "name", str(p))) for p in path)] = leaf
  return flat


def convert_state_dict(state_dict: Mapping[str, Any], expected_params: Any,
                       torch_module_for: Callable[[tuple[str, ...]], str], *, source: str = "checkpoint",
                       hint: str = "") -> dict:
  """Builds a Flax params tree from a PyTorch state dict, or raises one ConversionError listing every problem.

  Args:
    state_dict: PyTorch key -> array (numpy, or anything np.asarray accepts).
    expected_params: the model's params tree (arrays or ShapeDtypeStructs) giving every leaf's path and shape.
    torch_module_for: Flax module path (without the leaf name) -> PyTorch module name, e.g.
      ("down_0_block_1", "conv1") -> "down.0.block.1.conv1". May raise KeyError for a path it cannot name.
    source: what the state dict is, for messages.
    hint: appended to the error message (how to fix it).
  Returns:
    A nested dict of float32 numpy arrays with exactly the structure of `expected_params`.
  """
  used: set[str] = set()
  missing, misshaped, out = [], [], {}
  for path, expected in _flat_leaves(expected_params).items():
    *module_path, leaf_name = path
    key = f"{torch_module_for(tuple(module_path))}.{_TORCH_LEAF_NAME.get(leaf_name, leaf_name)}"
    if key not in state_dict:
      missing.append(key)
      continue
    used.add(key)
    raw = np.asarray(state_dict[key])
    value = torch_to_flax_array(leaf_name, raw, len(expected.shape))
    if tuple(value.shape) != tuple(expected.shape):
      misshaped.append(f"{key} {tuple(raw.shape)} (as Flax {'/'.join(path)}: {tuple(value.shape)}, "
                       f"expected {tuple(expected.shape)})")
      continue
    out[path] = value.astype(np.float32)
  unexpected = sorted(k for k in state_dict if k not in used and not k.endswith(IGNORED_KEY_SUFFIXES))
  problems = checkpoint.mismatch_listing(missing, unexpected, misshaped, noun="keys", separator=_SEPARATOR)
  if problems:
    raise ConversionError(f"The {source} does not match the model{_SEPARATOR}{problems}."
                          + (f" {hint}" if hint else ""))
  raise_on_nonfinite({f"{torch_module_for(tuple(path[:-1]))}.{_TORCH_LEAF_NAME.get(path[-1], path[-1])}": value
                      for path, value in out.items()}, source=source)
  return flax.traverse_util.unflatten_dict(out)


def raise_on_nonfinite(tensors: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> None:
  """Refuses NaN / Inf weights (a diverged or corrupted training run): one ConversionError naming the tensors.

  A model with them samples NaN, and calibration could not choose a quantization range for them.
  """
  bad = []
  for name, value in tensors.items():
    value = np.asarray(value)
    count = int(value.size - np.count_nonzero(np.isfinite(value)))
    if count:
      bad.append(f"{name} ({count} of {value.size} values)")
  if bad:
    raise ConversionError(f"The {source} holds NaN/Inf weights, so it cannot be converted: "
                          f"{checkpoint.listing('tensors', bad)}. Convert a checkpoint saved before its training run "
                          "diverged, or fetch the file again if it was corrupted.")


