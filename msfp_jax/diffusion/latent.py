"""Latent diffusion sampling: DDIM in latent space, classifier-free guidance, decoding to images.

The sampler is msfp_jax.diffusion.sample (one jitted lax.scan, data-parallel over a device mesh); this
module only builds the eps function (unconditional, conditional, or guided with the conditional and
unconditional passes batched together via `guided_eps_fn`) and decodes the latents with the first stage
as CompVis' `decode_first_stage` does: z / scale_factor, then (VQ) the codebook lookup, post_quant_conv
and the decoder. Labels and the guidance scale are checked here, where their values are concrete.

Typical use with a converted CompVis checkpoint (the models package loads it; this package knows nothing of
the loader, only of the model_config it returns):

    from msfp_jax import models
    dst = "checkpoints/ldm4_cin256_v2"
    ldm = LatentDiffusion.from_loaded(models.load(dst), models.load_first_stage(dst))
    labels = balanced_class_labels(ldm.num_classes, per_class=50, seed=0)[:8]
    images = ldm.generate(jax.random.key(0), SamplerConfig(num_steps=20, skip="ldm_uniform"),
                          labels=labels, guidance_scale=3.0)      # [8, 256, 256, 3] in [-1, 1]
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from msfp_jax import parallel
from msfp_jax.diffusion.samplers import SamplerConfig, guided_eps_fn, sample
from msfp_jax.diffusion.schedules import Schedule, make_schedule


def balanced_class_labels(num_classes: int, per_class: int, *, seed: int | None = None) -> np.ndarray:
  """Each class exactly `per_class` times (ImageNet evaluation: 50 per class), int32 [num_classes * per_class].

  Without a seed the labels are in class order (0,0,...,1,1,...); with a seed they are shuffled
  (deterministically), so that any batch of consecutive labels mixes classes.
  """
  for name, value in (("num_classes", num_classes), ("per_class", per_class)):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), per_class)
  if seed is not None:
    labels = np.random.default_rng(seed).permutation(labels)
  return labels


def check_guidance_scale(guidance_scale: Any) -> float:
  """The guidance scale as a float; a clear error for anything that is not a finite real number."""
  if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (numbers.Real, np.floating, np.integer)):
    raise ValueError(f"guidance_scale must be a number (e.g. 3.0 for ImageNet), got {guidance_scale!r} "
                     f"of type {type(guidance_scale).__name__}.")
  value = float(guidance_scale)
  if not math.isfinite(value):
    raise ValueError(f"guidance_scale must be finite, got {value}.")
  return value


def check_class_labels(labels: Any, num_classes: int, batch_size: int | None = None) -> np.ndarray:
  """Concrete labels as int32 [B], each in [0, num_classes); the null class is added by guidance itself."""
  array = np.asarray(labels)
  if array.ndim != 1:
    raise ValueError(f"labels must have shape [batch], got shape {array.shape}.")
  if array.size and not np.issubdtype(array.dtype, np.integer):
    if not (np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array))):
      raise ValueError(f"labels must be integers, got dtype {array.dtype}.")
  array = array.astype(np.int64)
  if array.size and (array.min() < 0 or array.max() >= num_classes):
    bad = array[(array < 0) | (array >= num_classes)]
    raise ValueError(f"class label out of range: {bad[:5].tolist()}; the model has {num_classes} classes "
                     f"(labels 0..{num_classes - 1}; the unconditional branch uses the null class by itself).")
  if batch_size is not None and array.shape[0] != batch_size:
    raise ValueError(f"got {array.shape[0]} labels for a batch of {batch_size}.")
  return array.astype(np.int32)


def unet_apply_fn(unet, unet_variables, *, conditional: bool) -> Callable:
  """(x, t[, y]) -> eps of a LDM UNet with its variables closed over."""
  if conditional:
    return lambda x, t, y: unet.apply(unet_variables, x, t, y)
  return lambda x, t: unet.apply(unet_variables, x, t)


def latent_eps_fn(apply_fn: Callable, *, labels=None, num_classes: int | None = None,
                  null_label: int | None = None, guidance_scale: Any = 1.0, batch_size: int | None = None
                  ) -> Callable:
  """The eps_fn(x, t) that msfp_jax.diffusion.sample walks with.

  Args:
    apply_fn: (x, t) -> eps for unconditional models, (x, t, y) -> eps for class-conditional ones (keep
      the same object across calls so that the compiled sampler is reused).
    labels: int [B] classes (class-conditional models only), each in [0, num_classes).
    num_classes: the number of real classes; None for an unconditional model.
    null_label: the class-table row of the unconditional branch (cin256: 1000).
    guidance_scale: s in eps_u + s (eps_c - eps_u); 1.0 is the plain conditional model (one pass).
    batch_size: checked against the number of labels when given.
  """
  scale = check_guidance_scale(guidance_scale)
  if num_classes is None:
    if labels is not None:
      raise ValueError("this model is unconditional: do not pass labels.")
    if scale != 1.0:
      raise ValueError("classifier-free guidance needs a class-conditional model; leave guidance_scale at 1.0.")
    return apply_fn
  if labels is None:
    raise ValueError(f"this model is class-conditional ({num_classes} classes): pass labels "
                     "(e.g. balanced_class_labels(num_classes, per_class)).")
  labels = check_class_labels(labels, num_classes, batch_size)
  if scale == 1.0:
    labels_device = jnp.asarray(labels)
    return lambda x, t: apply_fn(x, t, labels_device)
  if null_label is None:
    raise ValueError("classifier-free guidance needs the null class (null_label) of the model.")
  return guided_eps_fn(apply_fn, labels, int(null_label), scale)


@functools.lru_cache(maxsize=8)
def _compiled_decode(first_stage, force_not_quantize: bool):
  return jax.jit(lambda variables, z: first_stage.apply(variables, z, force_not_quantize, method="decode"))


def decode_latents(first_stage, first_stage_variables, latents, *, scale_factor: float,
                   force_not_quantize: bool = False, mesh: Mesh | None = None) -> jax.Array:
  """Images in [-1, 1] (NHWC, clipped) from latents, as LatentDiffusion.decode_first_stage: z / scale_factor,
  then the first stage's decode (VQ: nearest codebook entry unless force_not_quantize)."""
  if not (isinstance(scale_factor, numbers.Real) and scale_factor > 0):
    raise ValueError(f"scale_factor must be a positive number, got {scale_factor!r}.")
  z = jnp.asarray(latents, jnp.float32) / scale_factor
  if mesh is None and jax.device_count() > 1 and z.shape[0] % jax.device_count() == 0:
    mesh = parallel.data_mesh()
  if mesh is not None:
    z = parallel.shard_batch(z, mesh)
    first_stage_variables = parallel.replicate(first_stage_variables, mesh)
  images = _compiled_decode(first_stage, bool(force_not_quantize))(first_stage_variables, z)
  return jnp.clip(images, -1.0, 1.0)


def sample_latents(apply_fn: Callable, x_T, schedule: Schedule, sampler_config: SamplerConfig, rng=None, *,
                   labels=None, num_classes: int | None = None, null_label: int | None = None,
                   guidance_scale: Any = 1.0, return_trajectory: bool = False, mesh: Mesh | None = None):
  """Samples latents with msfp_jax.diffusion.sample (see `latent_eps_fn` for the arguments)."""
  x_T = jnp.asarray(x_T)
  eps_fn = latent_eps_fn(apply_fn, labels=labels, num_classes=num_classes, null_label=null_label,
                         guidance_scale=guidance_scale, batch_size=x_T.shape[0] if x_T.ndim else None)
  return sample(eps_fn, x_T, schedule, sampler_config, rng, return_trajectory=return_trajectory, mesh=mesh)


@dataclasses.dataclass(frozen=True, eq=False)
class LatentDiffusion:
  """A latent diffusion model: UNet, first stage, latent scale, conditioning and noise schedule.

  Build it with `LatentDiffusion.from_loaded(...)` from a loaded directory of the CompVis converter.
  """
  unet: Any
  unet_variables: Any
  first_stage: Any
  first_stage_variables: Any
  scale_factor: float
  schedule: Schedule
  latent_shape: tuple[int, ...]
  num_classes: int | None = None
  null_label: int | None = None

  @classmethod
  def from_loaded(cls, unet_loaded: tuple[Any, Any, dict], first_stage_loaded: tuple[Any, Any, dict]
                  ) -> LatentDiffusion:
    """From what msfp_jax.models.load(dst) and msfp_jax.models.load_first_stage(dst) return.

    Args:
      unet_loaded: (UNet module, its variables, the model_config dict), whose "schedule" (the noise schedule's
        make_schedule arguments, recorded by the converter) and "conditioning" are read here.
      first_stage_loaded: (autoencoder module, its variables, the first_stage dict with "scale_factor").
    """
    unet, unet_variables, meta = unet_loaded
    first_stage, fs_variables, fs_meta = first_stage_loaded
    conditioning = meta.get("conditioning") or {"kind": "none"}
    s = meta.get("schedule") or {}
    if not s:
      raise ValueError("the model's model_config.json has no 'schedule'; re-convert the checkpoint.")
    schedule = make_schedule(s["kind"], s["num_timesteps"], s["beta_start"], s["beta_end"])
    latent_shape = tuple(unet.example_inputs(1)[0].shape[1:])
    conditional = conditioning.get("kind") == "class"
    return cls(unet=unet, unet_variables=unet_variables, first_stage=first_stage,
               first_stage_variables=fs_variables, scale_factor=float(fs_meta["scale_factor"]),
               schedule=schedule, latent_shape=latent_shape,
               num_classes=int(conditioning["num_classes"]) if conditional else None,
               null_label=int(conditioning["null_class"]) if conditional else None)

  @functools.cached_property
  def apply_fn(self) -> Callable:
    """(x, t[, y]) -> eps; one object per model so that compiled samplers are reused."""
    return unet_apply_fn(self.unet, self.unet_variables, conditional=self.num_classes is not None)

  def sample_latents(self, x_T, sampler_config: SamplerConfig, rng=None, *, labels=None,
                     guidance_scale: Any = 1.0, return_trajectory: bool = False, mesh: Mesh | None = None):
    return sample_latents(self.apply_fn, x_T, self.schedule, sampler_config, rng, labels=labels,
                          num_classes=self.num_classes, null_label=self.null_label, guidance_scale=guidance_scale,
                          return_trajectory=return_trajectory, mesh=mesh)

  def decode(self, latents, *, mesh: Mesh | None = None) -> jax.Array:
    return decode_latents(self.first_stage, self.first_stage_variables, latents, scale_factor=self.scale_factor,
                          mesh=mesh)

  def generate(self, rng, sampler_config: SamplerConfig, *, num_samples: int | None = None, labels=None,
               guidance_scale: Any = 1.0, mesh: Mesh | None = None) -> jax.Array:
    """Images in [-1, 1]: x_T ~ N(0, I) from `rng`, latent sampling, decoding.

    The batch is len(labels) for class-conditional models, num_samples otherwise.
    """
    if labels is not None:
      batch = len(np.asarray(labels).reshape(-1))
    elif num_samples is not None:
      batch = int(num_samples)
    else:
      raise ValueError("pass labels (class-conditional models) or num_samples.")
    noise_key, sampler_key = jax.random.split(rng)
    x_T = jax.random.normal(noise_key, (batch, *self.latent_shape), jnp.float32)
    latents = self.sample_latents(x_T, sampler_config, sampler_key, labels=labels, guidance_scale=guidance_scale,
                                  mesh=mesh)
    return self.decode(latents, mesh=mesh)


__all__ = ["LatentDiffusion", "balanced_class_labels", "check_class_labels", "check_guidance_scale",
           "decode_latents", "latent_eps_fn", "sample_latents", "unet_apply_fn"]
