"""TALoRA: K LoRA banks per quantized layer and one timestep router for the network (method.md section 5).

Parameters are a plain pytree {"banks": nested dict path -> {"a", "b"}, "router": router params}; the bank tree
mirrors the Flax module paths ("down_0_block_0/conv1" -> banks["down_0_block_0"]["conv1"]) so that checkpoints
read like the model's own params.

The update reaches the model through the quantization interceptor's `kernel_update(path, kernel)` hook, called
for every quantized layer with its float kernel before weight fake-quantization: W_q = Q(W + scale * B_k A_k).
The model code does not change.

Routing is per call, not per sample: a UNet call merges one bank into every kernel, so all samples of the
batch must share the timestep. The data-free distillation and the samplers guarantee it (every sample of a
batch is at the same sampler step); `make_kernel_update` checks it whenever the timesteps are concrete.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.traverse_util
import jax
import numpy as np

from msfp_jax.lora import factors
from msfp_jax.lora import router as router_lib

KernelUpdate = Callable[[str, jax.Array], jax.Array]


class LoRAAttachError(ValueError):
  """LoRA would attach to no layer (or to a layer that does not exist)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TALoRAConfig:
  num_banks: int = 4                        # K LoRA pairs per layer; K = 1 is plain LoRA (the ablation baseline).
  rank: int = 4                             # r of every pair (the paper's models: 32).
  scale: float = 1.0                        # dW = scale * A B (LoRA's alpha / r).
  module_types: tuple[str, ...] = ("Conv", "Dense")  # layer types that get banks (if they are quantized).
  router: router_lib.RouterConfig = dataclasses.field(default_factory=router_lib.RouterConfig)

  def __post_init__(self):
    if int(self.num_banks) < 1:
      raise ValueError(f"TALoRA needs K >= 1 banks (K = 1 is plain LoRA); got num_banks={self.num_banks}.")
    if int(self.rank) < 1:
      raise ValueError(f"LoRA rank must be >= 1; got rank={self.rank}.")
    if self.router.num_banks != self.num_banks:
      raise ValueError(f"router.num_banks ({self.router.num_banks}) must equal num_banks ({self.num_banks}).")


def _field(info: Any, name: str):
  return info[name] if isinstance(info, Mapping) else getattr(info, name)


def select_layers(layers: Mapping[str, Any], config: TALoRAConfig) -> dict[str, tuple[int, ...]]:
  """path -> kernel shape of the layers that get LoRA banks: quantized layers of config.module_types.

  `layers` is what `msfp_jax.quant.discover_layers` returns (path -> LayerInfo with module_type,
  kernel_shape, quantized). LoRA attaching to no layer is an error, never a silent no-op.
  """
  selected = {}
  for path, info in layers.items():
    if not _field(info, "quantized") or _field(info, "module_type") not in config.module_types:
      continue
    shape = _field(info, "kernel_shape")
    if shape is None:
      continue
    selected[path] = tuple(int(d) for d in shape)
  if not selected:
    seen = sorted({f"{_field(i, 'module_type')}(quantized={bool(_field(i, 'quantized'))})" for i in layers.values()})
    raise LoRAAttachError(
        f"LoRA attaches to no layer: none of the {len(layers)} discovered layers is a quantized "
        f"{' or '.join(config.module_types)} (found: {', '.join(seen) or 'nothing'}). Check the quantization rules "
        "and lora.module_types.")
  return selected


def init_talora(rng: jax.Array, layers: Mapping[str, Any], config: TALoRAConfig) -> dict:
  """{"banks": nested path tree of {"a": [K, ..., r], "b": [K, r, out]}, "router": router params}."""
  selected = select_layers(layers, config)
  bank_rng, router_rng = jax.random.split(rng)
  flat = {}
  for i, (path, shape) in enumerate(sorted(selected.items())):
    flat[path] = factors.init_lora_bank(jax.random.fold_in(bank_rng, i), shape, rank=config.rank,
                                        num_banks=config.num_banks)
  banks = flax.traverse_util.unflatten_dict({tuple(p.split("/")): v for p, v in flat.items()})
  return {"banks": banks, "router": router_lib.init_router(router_rng, config.router)}


def flat_banks(banks: Mapping) -> dict[str, dict[str, jax.Array]]:
  """The nested bank tree as {"path/to/layer": {"a", "b"}}."""
  flat = flax.traverse_util.flatten_dict(banks)
  out: dict[str, dict[str, jax.Array]] = {}
  for key, value in flat.items():
    out.setdefault("/".join(key[:-1]), {})[key[-1]] = value
  return out


def route_batch(router_params: Mapping, config: TALoRAConfig, t) -> jax.Array:
  """Bank weights [K] for a batch whose samples share one timestep (straight-through one-hot).

  Raises ValueError when concrete timesteps of the batch differ: one call merges one bank.
  """
  t = router_lib.check_timesteps(t, config.router.num_timesteps)
  if not isinstance(t, jax.core.Tracer):
    values = np.asarray(t)
    if values.size > 1 and np.any(values != values[0]):
      raise ValueError(
          "TALoRA routes one bank per model call, so all samples of a batch must share the timestep; got "
          f"timesteps {np.unique(values)[:8]}. Call the model once per sampler step (as the samplers do).")
  return router_lib.route(router_params, config.router, t[:1])[0]


def make_kernel_update(talora_params: Mapping, config: TALoRAConfig, t=None, *,
                       bank: int | None = None) -> KernelUpdate:
  """The interceptor hook for one model call at timestep(s) t: kernel -> kernel + scale * sum_k w_k A_k B_k.

  Layers without a bank keep their kernel. With zero B (fresh banks) it returns the kernel unchanged, so the
  model is exactly the post-training-quantized one. `bank` instead of `t`: bank `bank` for every call (w its
  one-hot), its merged kernels W + scale * A_k B_k, which sampling and export compute once per bank.
  """
  if (t is None) == (bank is None):
    raise ValueError("make_kernel_update takes the timesteps t of the call or a fixed bank, not both.")
  if bank is None:
    weights = route_batch(talora_params["router"], config, t)
  elif 0 <= bank < config.num_banks:
    weights = jax.nn.one_hot(bank, config.num_banks)
  else:
    raise ValueError(f"bank {bank} does not exist: the TALoRA config has {config.num_banks} banks.")
  banks = flat_banks(talora_params["banks"])

  def kernel_update(path: str, kernel: jax.Array) -> jax.Array:
    layer_banks = banks.get(path)
    if layer_banks is None:
      return kernel
    delta = factors.mixed_lora_delta(layer_banks, weights)
    if delta.shape != kernel.shape:
      raise LoRAAttachError(f"LoRA bank for {path!r} makes an update of shape {delta.shape}, but the layer's "
                            f"kernel has shape {kernel.shape}: the banks belong to a different model.")
    return kernel + (config.scale * delta).astype(kernel.dtype)

  return kernel_update


def check_banks_match(talora_params: Mapping, layers: Mapping[str, Any], config: TALoRAConfig) -> None:
  """Every bank must name a selected layer of this model (else it would silently never apply)."""
  selected = select_layers(layers, config)
  unknown = sorted(set(flat_banks(talora_params["banks"])) - set(selected))
  if unknown:
    raise LoRAAttachError(f"LoRA banks for layers this model does not quantize: {unknown[:5]}"
                          f"{' ...' if len(unknown) > 5 else ''}.")
