"""The Flax method interceptors: module discovery, calibration recording and fake quantization.

This is the only library module that touches `flax.linen.intercept_methods` (method.md section 4; the
diagnostic msfp_jax.diagnostics.device_agreement also uses it, to record layer inputs). An interceptor sees
every module method call; ours act on `__call__` of the layers the rules select (Conv and Dense by
default, the attention MatMul when a rule names it), keyed by `'/'.join(module.path)`. The model code
contains no quantization code.

Enter `quantization_interceptor(...)` INSIDE the function you jit (e.g. around `model.apply` in a sampler's
eps_fn): the interceptor is Python state, not an argument, so it is not part of jit's cache key. Entered
around a call of an already-compiled function it would silently do nothing.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from msfp_jax.quant.config import DEFAULT_MODULE_TYPES, QuantConfig, QuantStateMismatchError
from msfp_jax.quant.fake_quant import fake_quant
from msfp_jax.quant.rules import CONCAT_TYPE, LayerInfo, ModuleRecord, resolve_layers
from msfp_jax.quant.state import LayerQuantState, QuantState

# kernel_update(path, kernel) -> kernel: called with a layer's float kernel before weight quantization,
# W_q = Q(kernel_update(path, W)); TALoRA returns W + B_k A_k for the timestep's LoRA bank k.
KernelUpdate = Callable[[str, jax.Array], jax.Array]


def module_path(module: nn.Module) -> str:
  """The '/'-joined Flax module path, the key of rules and of QuantState.layers."""
  return "/".join(str(name) for name in module.path)


def module_type_names(module: nn.Module) -> tuple[str, ...]:
  """Class names of the module type's MRO (most derived first), so a subclass of nn.Conv matches "Conv"."""
  return tuple(cls.__name__ for cls in type(module).__mro__ if cls not in (object, nn.Module))


def _module_kernel(module: nn.Module):
  try:
    return module.variables.get("params", {}).get("kernel")
  except Exception:  # pylint: disable=broad-except  (an unbound module or a module without variables)
    return None


def _is_call(context) -> bool:
  return context.method_name == "__call__"


# ----------------------------------------------------------------------------- discovery
def trace_modules(model: nn.Module, variables, *args, **kwargs) -> dict[str, ModuleRecord]:
  """Every module `__call__` of `model.apply(variables, *args)`, traced abstractly (jax.eval_shape).

  A module whose first input is the very array a `Concat` module returned records the width of the
  concatenation's first part (`input_split`): that is how shortcut splitting finds the layers it applies to.
  Identity, not shape, links them, so an operation in between (a cast, a norm) breaks the link.
  """
  records: dict[str, ModuleRecord] = {}
  concat_outputs: dict[int, tuple[Any, int]] = {}  # id(output) -> (output, first part's channels)

  def intercept(next_fun, call_args, call_kwargs, context):
    if not _is_call(context):
      return next_fun(*call_args, **call_kwargs)
    module = context.module
    path = module_path(module)
    type_names = module_type_names(module)
    if path not in records:
      kernel = _module_kernel(module)
      num_inputs = sum(1 for a in call_args if hasattr(a, "shape"))
      joined = concat_outputs.get(id(call_args[0])) if call_args else None
      records[path] = ModuleRecord(path=path, type_names=type_names,
                                   kernel_shape=None if kernel is None else tuple(kernel.shape),
                                   num_inputs=num_inputs,
                                   input_split=joined[1] if joined and joined[0] is call_args[0] else None)
    out = next_fun(*call_args, **call_kwargs)
    if CONCAT_TYPE in type_names:
      concat_outputs[id(out)] = (out, int(call_args[0].shape[-1]))  # keeps `out` alive, so the id stays its
    return out

  def run(variables, *args):
    with nn.intercept_methods(intercept):
      return model.apply(variables, *args, **kwargs)

  jax.eval_shape(run, variables, *args)
  return records


def discover_layers(model: nn.Module, variables, *args, config: QuantConfig = QuantConfig(),
                    **kwargs) -> dict[str, LayerInfo]:
  """What config.rules select in `model` called on `args`: {path: LayerInfo}, in call order.

  Lists every Conv, Dense and MatMul call (and every module of a type a rule names), quantized or not.
  Raises RuleMatchError when a rule matches no module (the message lists the module paths).
  """
  return resolve_layers(trace_modules(model, variables, *args, **kwargs), config)


# ----------------------------------------------------------------------------- calibration recording
def _activation_summary(x: jax.Array, uniforms: jax.Array, samples_per_batch: int) -> dict[str, jax.Array]:
  """min/max over the finite values, the count of non-finite values, and a subsample of the values.

  The subsample takes the values at floor(u * size) for the given uniforms u in [0, 1) (drawn on the host:
  a random-number generator inside the recorded graph, once per layer, made its compilation minutes long).
  """
  flat = jnp.ravel(x).astype(jnp.float32)
  finite = jnp.isfinite(flat)
  size = flat.shape[0]
  if size <= samples_per_batch:
    samples = flat  # small inputs contribute every value (exact statistics for small calibration sets)
  else:
    index = jnp.minimum((uniforms[:samples_per_batch] * size).astype(jnp.int32), size - 1)
    samples = flat[index]
  return {
      "min": jnp.min(jnp.where(finite, flat, jnp.inf)),
      "max": jnp.max(jnp.where(finite, flat, -jnp.inf)),
      "nonfinite": jnp.sum(~finite).astype(jnp.int32),
      "samples": samples,
  }


def _activation_operands(args, is_matmul: bool, act_split: int | None) -> tuple[jax.Array, ...]:
  """What gets its own activation quantizer: both MatMul operands, the two parts of a split input, or the
  input."""
  if is_matmul:
    return tuple(args[:2])
  if act_split is not None:
    _check_split(args[0], act_split)
    return args[0][..., :act_split], args[0][..., act_split:]
  return (args[0],)


def _check_split(x, act_split: int) -> None:
  if not 0 < act_split < x.shape[-1]:
    raise QuantStateMismatchError(
        f"a split input quantizer expects more than {act_split} channels (its first part) but the input has "
        f"shape {tuple(x.shape)}; was the state calibrated for this model?")


# Shifts the shared uniforms between layer inputs (the golden ratio's fractional part: successive shifts are
# spread evenly over [0, 1)), so different layers do not sample the same relative positions.
_GOLDEN = 0.6180339887498949


@contextlib.contextmanager
def recording_interceptor(layers: Mapping[str, LayerInfo], uniforms: jax.Array, samples_per_batch: int,
                          sink: dict[str, list]) -> Iterator[None]:
  """Calibration mode: appends, per call of each quantized layer, a summary of each activation operand.

  `sink[path]` receives one tuple per call with one summary dict per operand (the input of a Conv/Dense,
  both operands of a MatMul); the summaries are traced values, so the enclosing (jitted) function returns
  them. `uniforms` ([samples_per_batch] in [0, 1), fresh per batch) choose the subsample; each operand shifts
  them by its own offset.
  """
  operand_count = [0]

  def intercept(next_fun, args, kwargs, context):
    if _is_call(context):
      path = module_path(context.module)
      info = layers.get(path)
      if info is not None and info.quantized:
        summaries = []
        for x in _activation_operands(args, info.is_matmul, info.act_split):
          shift = (operand_count[0] * _GOLDEN) % 1.0
          operand_count[0] += 1
          summaries.append(_activation_summary(x, jnp.mod(uniforms + shift, 1.0), samples_per_batch))
        sink.setdefault(path, []).append(tuple(summaries))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(intercept):
    yield


# ----------------------------------------------------------------------------- quantized mode
def _zero_point_or_zero(zero_point):
  # Signed quantizers have no zero point (None); fake_quant's grid is then centred on 0.
  return 0.0 if zero_point is None else zero_point


def quantize_kernel(path: str, kernel: jax.Array, layer: LayerQuantState,
                    kernel_update: KernelUpdate | None = None) -> jax.Array:
  """W_q = Q(kernel_update(path, W)), per output channel (the last kernel axis, Flax layout)."""
  if kernel_update is not None:
    kernel = kernel_update(path, kernel)
  if layer.weight_maxval.shape != (kernel.shape[-1],):
    raise QuantStateMismatchError(
        f"layer {path!r}: the quantization state has {layer.weight_maxval.shape} weight maxvals but the kernel "
        f"has shape {tuple(kernel.shape)} (one maxval per output channel, the last axis, is needed); was the "
        "state calibrated for this model?")
  return fake_quant(kernel, layer.weight_format, layer.weight_maxval,
                    _zero_point_or_zero(layer.weight_zero_point))


def _quantize_activation(x, fmt, maxval, zero_point):
  return fake_quant(x, fmt, maxval, _zero_point_or_zero(zero_point))


def quantize_layer_input(layer: LayerQuantState, x: jax.Array) -> jax.Array:
  """x_hat of a layer's (first) input: one quantizer, or one per part of a split input."""
  if layer.act_split is None:
    return _quantize_activation(x, layer.act_format, layer.act_maxval, layer.act_zero_point)
  _check_split(x, layer.act_split)
  return jnp.concatenate(
      [_quantize_activation(x[..., :layer.act_split], layer.act_format, layer.act_maxval, layer.act_zero_point),
       _quantize_activation(x[..., layer.act_split:], layer.skip_act_format, layer.skip_act_maxval,
                            layer.skip_act_zero_point)], axis=-1)


def input_zero_points(layer: LayerQuantState, channels: int) -> jax.Array:
  """The zero point of each input channel of a Conv/Dense layer ([channels]; 0 where signed)."""
  z = jnp.full((channels,), _zero_point_or_zero(layer.act_zero_point), jnp.float32)
  if layer.act_split is not None:
    z = z.at[layer.act_split:].set(_zero_point_or_zero(layer.skip_act_zero_point))
  return z


@flax.struct.dataclass
class CodeDomainLayer:
  """How an integer kernel runs a layer whose input has a zero point z (msfp_jax.quant.packed writes these).

  It computes on q = x_hat - z (a code times the scale, no offset), pads with the q value of the code
  nearest to real 0, and adds W z through the bias: W x_hat + b = W q + (b + W z). When 0 is on the grid
  (QuantConfig.zero_point_on_grid) the pad value is exactly -z and this equals the fake-quantized layer.
  """

  folded_bias: jax.Array  # [out channels]: b + sum over the kernel's taps and inputs of W_q * z
  pad_value: jax.Array  # [in channels]: the q value a kernel pads with


def _explicit_padding(module: nn.Module, x: jax.Array) -> list[tuple[int, int]]:
  """The Conv's padding as (low, high) per spatial axis, as flax.linen.Conv would apply it."""
  spatial = x.shape[1:-1]
  kernel = tuple(module.kernel_size)
  strides = module.strides or 1
  strides = (strides,) * len(kernel) if isinstance(strides, int) else tuple(strides)
  dilation = module.kernel_dilation or 1
  dilation = (dilation,) * len(kernel) if isinstance(dilation, int) else tuple(dilation)
  padding = module.padding
  if isinstance(padding, str):
    if padding == "VALID":
      return [(0, 0)] * len(kernel)
    if padding == "SAME":
      window = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilation))
      return list(jax.lax.padtype_to_pads(spatial, window, strides, "SAME"))
    raise QuantStateMismatchError(f"code-domain execution supports VALID, SAME and explicit Conv padding, not "
                                  f"{padding!r} (layer {module_path(module)!r})")
  return [tuple(p) for p in nn.linear.canonicalize_padding(padding, len(kernel))]


def _code_domain_call(module: nn.Module, x_hat: jax.Array, kernel: jax.Array, layer: LayerQuantState,
                      code: CodeDomainLayer):
  q = x_hat - input_zero_points(layer, x_hat.shape[-1])
  overrides = {"use_bias": False}
  if "Conv" in module_type_names(module):
    pads = [(0, 0), *_explicit_padding(module, q), (0, 0)]
    border = jnp.pad(jnp.zeros(q.shape[:-1] + (1,), q.dtype), pads, constant_values=1.0)
    q = jnp.pad(q, pads) + border * code.pad_value
    overrides["padding"] = "VALID"
  clone = module.clone(parent=None, name=None, **overrides)
  return clone.apply({"params": {"kernel": kernel}}, q) + code.folded_bias


@contextlib.contextmanager
def quantization_interceptor(qstate: QuantState, *, kernel_update: KernelUpdate | None = None,
                             weights_prequantized: bool = False, strict: bool = True,
                             code_domain: Mapping[str, CodeDomainLayer] | None = None) -> Iterator[None]:
  """Context manager: fake-quantizes the inputs and kernels of the layers in `qstate`.

  Args:
    qstate: the calibrated (possibly trained) state; its arrays may be traced values.
    kernel_update: optional `(path, kernel) -> kernel` applied to the float kernel before weight
      quantization (TALoRA's W + B_k A_k). Not allowed with weights_prequantized (the kernels in the
      variables are already quantized; pass the update to prequantize_weights instead).
    weights_prequantized: the variables' kernels went through prequantize_weights, so only the activations
      are rounded at call time (the fast path for sampling).
    strict: raise QuantStateMismatchError for a Conv/Dense call whose path the state neither quantizes nor
      lists as kept in FP (a state calibrated for another model). Pass False when other Flax models (e.g. a
      timestep router) are applied inside the context; their layers then pass through unquantized.
    code_domain: {path: CodeDomainLayer} for layers to run as an integer kernel would (on codes, padded
      with the code of 0, zero point folded into the bias); needs weights_prequantized (the packed model's
      decoded kernels). msfp_jax.quant.packed.code_domain_apply passes it.

  Enter it inside the traced function; see the module docstring.
  """
  if weights_prequantized and kernel_update is not None:
    raise ValueError("kernel_update cannot be applied to prequantized weights: pass it to "
                     "prequantize_weights(variables, qstate, kernel_update=...) instead")
  if code_domain and not weights_prequantized:
    raise ValueError("code_domain runs the packed model's decoded kernels: pass weights_prequantized=True")
  code_domain = code_domain or {}
  known_fp = frozenset(qstate.unquantized)
  # Recursion guard: the parameter-free clone called below is itself a Conv/Dense whose __call__ reaches
  # this interceptor again (with path ''); while it runs, everything passes through.
  inside_clone = [False]

  def intercept(next_fun, args, kwargs, context):
    if inside_clone[0] or not _is_call(context):
      return next_fun(*args, **kwargs)
    module = context.module
    path = module_path(module)
    layer = qstate.layers.get(path)
    if layer is None:
      if (strict and path not in known_fp and set(DEFAULT_MODULE_TYPES).intersection(module_type_names(module))
          and not module.is_initializing()):
        raise QuantStateMismatchError(
            f"{module_type_names(module)[0]} layer {path!r} is neither quantized nor listed as kept in full "
            "precision by this quantization state: the state was calibrated for another model (or other "
            "rules). Re-run calibrate for this model.")
      return next_fun(*args, **kwargs)
    if module.is_initializing():
      return next_fun(*args, **kwargs)  # model.init under the interceptor: nothing to quantize yet
    x = quantize_layer_input(layer, args[0])
    if layer.is_matmul:
      b = _quantize_activation(args[1], layer.rhs_act_format, layer.rhs_act_maxval, layer.rhs_act_zero_point)
      return next_fun(x, b, *args[2:], **kwargs)
    if path in code_domain:
      inside_clone[0] = True  # the call applies a clone of the layer (see below)
      try:
        return _code_domain_call(module, x, module.variables["params"]["kernel"], layer, code_domain[path])
      finally:
        inside_clone[0] = False
    if weights_prequantized:
      return next_fun(x, *args[1:], **kwargs)
    params = dict(module.variables["params"])
    params["kernel"] = quantize_kernel(path, params["kernel"], layer, kernel_update)
    # Why a clone: a Flax layer reads its kernel from its scope inside __call__, and the scope's variables
    # are immutable during apply. Applying a parent-free clone of the same module to {'params': ...} with the
    # quantized kernel runs the layer's own __call__ code, so padding, strides, dilation, feature groups,
    # bias, dtype/precision and any subclass behaviour are exactly those of the original layer; no
    # re-implementation of conv/dense semantics is needed.
    clone = module.clone(parent=None, name=None)
    inside_clone[0] = True
    try:
      return clone.apply({"params": params}, x, *args[1:], **kwargs)
    finally:
      inside_clone[0] = False

  with nn.intercept_methods(intercept):
    yield


def quantized_apply(model: nn.Module, variables, qstate: QuantState, *args,
                    kernel_update: KernelUpdate | None = None, weights_prequantized: bool = False,
                    strict: bool = True, **kwargs):
  """`model.apply(variables, *args, **kwargs)` with the layers of `qstate` fake-quantized.

  Traceable: call it inside jax.jit (the interceptor is entered within the call).
  """
  with quantization_interceptor(qstate, kernel_update=kernel_update, weights_prequantized=weights_prequantized,
                                strict=strict):
    return model.apply(variables, *args, **kwargs)
