"""The three models a run compares, always from the same starting noise, and their samplers.

  fp         the full-precision model,
  ptq        the calibrated MSFP model before fine-tuning (post-training quantization),
  finetuned  the TALoRA + DFA fine-tuned model.

For sampling, quantized weights are rounded once per TALoRA bank (not on every call) and each sampler step picks
its bank from a table of the router's choice per timestep; only activations are rounded at call time.
"""
from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax import diffusion, evaluation, lora, quant
from msfp_jax.diffusion import latent
from msfp_jax.models import ldm_unet
from msfp_jax.train import calibration, finetune, pipeline

MODELS = ("fp", "ptq", "finetuned")


def sampler_eps(apply: Callable, bundle: pipeline.ModelBundle, labels) -> Callable:
  """The eps function a sampler calls: `apply` itself, or with classifier-free guidance for `labels`."""
  if bundle.conditional:
    return diffusion.guided_eps_fn(apply, labels, bundle.null_label, bundle.guidance_scale)
  return apply


class QuantizedSampler:
  """eps functions of the quantized models, built once per stage so the compiled samplers are reused.

  `talora_params` is None for plain PTQ, else the trained TALoRA parameters: each bank's merged kernels
  Q(W + B_k A_k) are computed once and stacked; at step t the sampler indexes the stack with bank_of_timestep[t].
  """

  def __init__(self, bundle: pipeline.ModelBundle, qstate, talora_params=None, talora_config=None):
    self.bundle = bundle
    self.qstate = qstate
    variables = bundle.variables
    if talora_params is None:
      self.bank_of_timestep = None
      weight_sets = [quant.prequantize_weights(variables, qstate)]
    else:
      self.bank_of_timestep = lora.allocation(talora_params["router"], talora_config.router).astype(np.int32)
      weight_sets = [quant.prequantize_weights(variables, qstate,
                                               lora.make_kernel_update(talora_params, talora_config, bank=k))
                     for k in range(talora_config.num_banks)]
    self.stacked_variables = jax.tree.map(lambda *xs: jnp.stack(xs), *weight_sets)
    self.weight_sets = weight_sets
    stacked, table, model = self.stacked_variables, self.bank_of_timestep, bundle.model
    table = None if table is None else jnp.asarray(table)

    def apply(x, t, *label):
      k = 0 if table is None else table[t[0]]  # one bank per call: the batch shares the sampler step
      chosen = jax.tree.map(lambda s: s[k], stacked)
      return quant.quantized_apply(model, chosen, qstate, x, t, *label, weights_prequantized=True)
    self.apply = apply


class Models:
  """The three models of a run, loaded lazily from the workdir."""

  def __init__(self, config, workdir: pathlib.Path):
    self.config, self.workdir = config, pathlib.Path(workdir)
    self.bundle = pipeline.load_model(config)
    self.schedule = pipeline.schedule_from(config)
    self.sampler_config = pipeline.sampler_from(config)
    self._cache: dict[str, Callable] = {}
    self._decode = None
    if self.bundle.meta.get("first_stage"):
      # Latent diffusion: the first stage stays in full precision and turns sampled latents into images.
      first_stage, first_stage_variables, info = ldm_unet.load_first_stage(pipeline.model_dir(config.model.path))
      scale_factor = float(info["scale_factor"])
      self._decode = jax.jit(lambda z: latent.decode_latents(first_stage, first_stage_variables, z,
                                                             scale_factor=scale_factor))

  def apply_fn(self, name: str) -> Callable:
    """(x, t[, y]) -> eps of model `name`."""
    if name not in self._cache:
      bundle = self.bundle
      if name == "fp":
        variables = bundle.variables
        self._cache[name] = lambda x, t, *y: bundle.model.apply(variables, x, t, *y)
      elif name == "ptq":
        self._cache[name] = QuantizedSampler(bundle, calibration.load_calibration(self.workdir)).apply
      elif name == "finetuned":
        result = finetune.load_finetuned(self.config, self.workdir)
        self._cache[name] = QuantizedSampler(bundle, result.qstate, result.params, result.talora_config).apply
      else:
        raise ValueError(f"Unknown model {name!r}; expected one of {MODELS}.")
    return self._cache[name]

  def fixed_noise(self, num_images: int, seed: int | None = None):
    """(x_T, labels, rng): the starting noise (and class labels) that the sample and export stages and the
    ablation give every model, and the sampler's key; a function of the seed alone (default config.seed)."""
    seed = int(self.config.seed if seed is None else seed)
    x_T, labels = pipeline.noise_batch(seed, pipeline.NoisePurpose.SAMPLE, 0, int(num_images),
                                       self.bundle.sample_shape, self.bundle.num_classes)
    return x_T, labels, jax.random.key(seed)

  def sample(self, name: str, x_T: np.ndarray, labels: np.ndarray | None, rng) -> np.ndarray:
    """Images in [-1, 1] (latent models: decoded by the full-precision first stage)."""
    eps_fn = sampler_eps(self.apply_fn(name), self.bundle, labels)
    return self.decode(diffusion.sample(eps_fn, x_T, self.schedule, self.sampler_config, rng))

  def decode(self, x_0) -> np.ndarray:
    return np.asarray(x_0 if self._decode is None else self._decode(x_0))

  def sample_fn(self, name: str) -> Callable:
    """(rng, batch[, labels]) -> images in [-1, 1], for the evaluation loop (labels: class-conditional models,
    from `eval_labels`)."""
    bundle = self.bundle

    def fn(rng, batch_size, labels=None):
      if bundle.conditional and labels is None:
        raise ValueError("a class-conditional model samples for given labels (evaluation: eval_labels)")
      noise_key, _, step_key = jax.random.split(rng, 3)  # three keys, as before labels were given
      x_T = jax.random.normal(noise_key, (batch_size, *bundle.sample_shape), jnp.float32)
      images = self.sample(name, x_T, None if labels is None else np.asarray(labels), step_key)
      return np.clip(images, -1.0, 1.0)
    return fn

  def eval_labels(self, num_samples: int, seed: int) -> np.ndarray | None:
    """The evaluation's class labels: balanced (num_samples / classes each), shuffled; None if unconditional."""
    if not self.bundle.conditional:
      return None
    return evaluation.balanced_labels(num_samples, self.bundle.num_classes, seed)


class Context:
  """What the stages of one run share: one set of loaded models for the sample, eval and export stages, whose
  compiled samplers are reused across them (with sample.num_images = evaluation.batch_size, eval compiles
  nothing new). Loaded on first use: a run whose later stages are current loads nothing."""

  def __init__(self, config, workdir: pathlib.Path):
    self.config, self.workdir = config, pathlib.Path(workdir)

  @functools.cached_property
  def models(self) -> Models:
    return Models(self.config, self.workdir)
