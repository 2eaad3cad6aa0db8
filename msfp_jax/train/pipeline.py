"""From an ml_collections experiment config to the objects the stages use.

Model, schedule, sampler, quantization config and TALoRA config are built here once, so that calibration,
fine-tuning and the later stages (msfp_jax.run) agree on them. The noise of every batch is a pure function
of (seed, purpose, index): a resumed run draws exactly what an uninterrupted one drew.
"""
from __future__ import annotations

import dataclasses
import enum
import pathlib
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from msfp_jax import diffusion, lora, models, quant

BUILTIN_MODEL = "builtin"


class NoisePurpose(enum.IntEnum):
  """What a seeded draw is for. Every draw of the pipeline comes from a generator seeded with (seed, purpose,
  index) (`purpose_rng`), so draws of two purposes never coincide. A value is part of the results: changing it
  changes every number computed from its draws."""
  CALIBRATION = 1           # starting noise of the calibration trajectories (index: calibration batch)
  FINETUNE = 2              # starting noise and labels of the fine-tuning trajectories (index: trajectory j)
  SAMPLE = 3                # the fixed noise of the sample and export stages and of the ablation (index 0)
  FINETUNE_VISIT_ORDER = 4  # the order in which fine-tuning visits the sampler steps of trajectory j (index: j)


def model_dir(path: str) -> pathlib.Path:
  """The converted model directory named by config.model.path ("builtin", "builtin:cifar10": shipped models)."""
  return models.resolve_model_path(path)


@dataclasses.dataclass(frozen=True)
class ModelBundle:
  """The FP model and what the stages need to feed it."""
  model: Any                      # flax module: apply(variables, x, t[, y])
  variables: Any                  # {"params": ...}, frozen
  meta: dict                      # model_config.json
  sample_shape: tuple[int, ...]   # one x_t without the batch axis (NHWC image or latent)
  num_classes: int                # 0: unconditional
  null_label: int
  guidance_scale: float

  @property
  def conditional(self) -> bool:
    return self.num_classes > 0


def load_model(config) -> ModelBundle:
  path = model_dir(config.model.path)
  model, variables, meta = models.load(path)
  if not hasattr(model, "example_inputs"):
    raise ValueError(f"The model at {path} ({meta.get('architecture')}) has no example_inputs(); the pipeline "
                     "needs it to know the shape of x_t.")
  inputs = model.example_inputs(1)
  takes_labels = len(inputs) > 2
  num_classes = int(config.model.num_classes)
  null_label = int(config.model.null_label)
  # Converted CompVis models record their class conditioning (cin256: 1000 classes, null class 1000).
  conditioning = meta.get("conditioning") or {}
  if takes_labels and num_classes <= 0:
    model_classes = meta.get("config", {}).get("num_classes") or conditioning.get("num_classes")
    if not model_classes:
      raise ValueError(f"The model at {path} is class-conditional: set config.model.num_classes.")
    num_classes = int(model_classes)
  if takes_labels and null_label < 0 and conditioning.get("null_class") is not None:
    null_label = int(conditioning["null_class"])
  if not takes_labels and num_classes > 0:
    raise ValueError(f"config.model.num_classes = {num_classes}, but the model at {path} is unconditional; "
                     "set config.model.num_classes = 0.")
  return ModelBundle(model=model, variables=variables, meta=meta, sample_shape=tuple(inputs[0].shape[1:]),
                     num_classes=num_classes, null_label=null_label,
                     guidance_scale=float(config.sampler.guidance_scale))


def schedule_from(config) -> diffusion.Schedule:
  s = config.schedule
  return diffusion.make_schedule(s.kind, s.num_timesteps, s.beta_start, s.beta_end)


def sampler_from(config) -> diffusion.SamplerConfig:
  s = config.sampler
  return diffusion.SamplerConfig(kind=s.kind, num_steps=int(s.num_steps), eta=float(s.eta), skip=s.skip)


def quant_config_from(config):
  """QuantConfig with the rules of the config: high-precision layers at 8 bits, attention matmuls optional."""
  q = config.quant
  rules = []
  if q.high_precision_paths:
    rules.append(quant.QuantRule(path=q.high_precision_paths, weight_bits=int(q.high_precision_bits),
                                 act_bits=int(q.high_precision_bits)))
  if q.quantize_attention:
    rules.append(quant.QuantRule(path=".*", module_types=("MatMul",), act_bits=int(q.attention_bits)))
  return quant.QuantConfig(weight_bits=int(q.weight_bits), act_bits=int(q.act_bits), kind=q.kind,
                           sign_mode=q.sign_mode, one_sided_alpha=float(q.aal_alpha), rules=tuple(rules),
                           split_shortcut=q.split_shortcut, zero_point_on_grid=q.zero_point_on_grid,
                           seed=int(config.calibration.seed))


def talora_config_from(config) -> lora.TALoRAConfig:
  c = config.lora
  router = lora.RouterConfig(num_banks=int(c.num_banks), num_timesteps=int(config.schedule.num_timesteps),
                             embed_dim=int(c.router_embed_dim), hidden_dim=int(c.router_hidden_dim),
                             init_sharpness=float(c.router_init_sharpness))
  return lora.TALoRAConfig(num_banks=int(c.num_banks), rank=int(c.rank), scale=float(c.scale), router=router)


def purpose_rng(seed: int, purpose: NoisePurpose, index: int) -> np.random.Generator:
  """The generator of draw `index` of `purpose`: a pure function of its arguments."""
  return np.random.default_rng([int(seed), int(purpose), int(index)])


def noise_batch(seed: int, purpose: NoisePurpose, index: int, batch_size: int, shape: tuple[int, ...],
                num_classes: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
  """Global starting noise x_T [B, *shape] (and labels) of batch `index`: a pure function of its arguments.

  Every process computes the same global batch and feeds its own rows (see msfp_jax.parallel.host_local_to_global).
  """
  rng = purpose_rng(seed, purpose, index)
  x = rng.standard_normal((batch_size, *shape), dtype=np.float32)
  labels = rng.integers(0, num_classes, batch_size).astype(np.int32) if num_classes > 0 else None
  return x, labels


def eps_fn_with_labels(bundle: ModelBundle) -> Callable:
  """(variables, x, t, y) -> eps of the FP model (y ignored for unconditional models)."""
  model = bundle.model
  if bundle.conditional:
    return lambda variables, x, t, y: model.apply(variables, x, t, y)
  return lambda variables, x, t, y: model.apply(variables, x, t)


def guided(apply_fn: Callable, bundle: ModelBundle) -> Callable:
  """Wraps (x, t, y) -> eps into classifier-free guidance when the model is conditional (cond+uncond batched)."""
  if not bundle.conditional or bundle.guidance_scale == 1.0:
    return apply_fn

  def fn(x, t, y):
    batch = x.shape[0]
    both = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    jnp.concatenate([y, jnp.full_like(y, bundle.null_label)]))
    cond, uncond = both[:batch], both[batch:]
    return uncond + bundle.guidance_scale * (cond - uncond)
  return fn


class TeacherSampler:
  """The FP teacher's trajectories: msfp_jax.diffusion.sample with return_trajectory=True.

  Keeps one eps function object alive so that the diffusion package reuses its compiled sampler.
  """

  def __init__(self, bundle: ModelBundle, schedule, sampler_config, mesh=None):
    self.bundle, self.schedule, self.sampler_config, self.mesh = bundle, schedule, sampler_config, mesh
    variables = bundle.variables
    apply = eps_fn_with_labels(bundle)
    self._eps_uncond = lambda x, t: apply(variables, x, t, None)
    self._eps_labels = lambda x, t, y: apply(variables, x, t, y)

  def __call__(self, x_T, labels, rng) -> diffusion.Trajectory:
    b = self.bundle
    if b.conditional:
      eps_fn = diffusion.guided_eps_fn(self._eps_labels, labels, b.null_label, b.guidance_scale)
    else:
      eps_fn = self._eps_uncond
    _, trajectory = diffusion.sample(eps_fn, x_T, self.schedule, self.sampler_config, rng,
                                     return_trajectory=True, mesh=self.mesh)
    return trajectory
