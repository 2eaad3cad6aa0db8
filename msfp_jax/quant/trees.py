"""Params-tree utilities of the quantization package: a layer's parameters by module path, and the weights
quantized once (`prequantize_weights`, for `quantized_apply(..., weights_prequantized=True)`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from msfp_jax.quant.config import QuantStateMismatchError
from msfp_jax.quant.interceptor import KernelUpdate, quantize_kernel
from msfp_jax.quant.state import QuantState


def params_at(params: Mapping[str, Any], path: str) -> Mapping[str, Any]:
  """The parameter dict of the module at `path` ('/'-joined) inside a params tree."""
  node = params
  for name in path.split("/") if path else ():
    if not isinstance(node, Mapping) or name not in node:
      raise QuantStateMismatchError(
          f"no parameters for layer {path!r} in the variables (missing {name!r}); the quantization state "
          "does not match these variables")
    node = node[name]
  return node


def replace_at(tree: Mapping[str, Any], names: list[str], leaf_name: str, value) -> dict:
  """A copy of `tree` with tree[names[0]]...[names[-1]][leaf_name] = value (the dicts on the way copied)."""
  out = dict(tree)
  if names:
    out[names[0]] = replace_at(tree[names[0]], names[1:], leaf_name, value)
  else:
    out[leaf_name] = value
  return out


def prequantize_weights(variables, qstate: QuantState, kernel_update: KernelUpdate | None = None):
  """Returns `variables` with every quantized layer's kernel replaced by Q(kernel_update(path, W)).

  Use with `weights_prequantized=True` so that weights are rounded once per state instead of on every call.
  Traceable (jit it, or differentiate through it when training LoRA factors or weight maxvals).
  """
  if "params" not in variables:
    raise QuantStateMismatchError("prequantize_weights needs variables with a 'params' collection")
  params = variables["params"]
  for path, layer in qstate.layers.items():
    if layer.is_matmul:
      continue
    layer_params = params_at(params, path)
    if "kernel" not in layer_params:
      raise QuantStateMismatchError(f"layer {path!r} has no 'kernel' parameter in the variables")
    quantized = quantize_kernel(path, layer_params["kernel"], layer, kernel_update)
    params = replace_at(params, path.split("/") if path else [], "kernel", quantized)
  out = dict(variables)
  out["params"] = params
  return out
