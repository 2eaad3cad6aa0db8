"""DDIM and ancestral DDPM samplers, jitted over the whole trajectory.

Every sampler step here is linear in (x_t, eps, z):

    x_prev = c_x * x_t + gamma_t * eps(x_t, t) + c_noise * z,      z ~ N(0, I)

The per-step coefficients are computed once in float64 numpy from the schedule and passed to one
jitted `lax.scan` as arrays, so changing eta, the schedule or the skipping never recompiles; only the
number of steps, the batch shape and the eps function do. gamma_t is the coefficient that the DFA
loss weights by (method.md section 6).

Timesteps follow the DDIM reference code (ermongroup/ddim, `generalized_steps`): the visited sequence
`seq` ("uniform": range(0, T, T // S); "quad": int(linspace(0, sqrt(0.8 T), S) ** 2)) is walked in
descending order and step seq[i] goes to seq[i - 1], the first one to "-1" where alpha_bar := 1.
"uniform" gives more than S steps when T % S != 0 and "quad" repeats small timesteps at large S (a
repeated timestep is an identity step for DDIM), exactly as the reference does.
"""
from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from msfp_jax import parallel
from msfp_jax.diffusion.schedules import Schedule

SAMPLER_KINDS = ("ddim", "ddpm")
# "ldm_uniform": CompVis latent-diffusion's DDIM timesteps, range(0, T, T // S) + 1, where the last
# step goes to alpha_bar_0 instead of 1.
SKIP_KINDS = ("uniform", "quad", "ldm_uniform")

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerConfig:
  """How to walk from x_T to x_0.

  Attributes:
    kind: "ddim" (Song et al.; eta = 0 is deterministic) or "ddpm" (ancestral sampling with the
      posterior variance beta_tilde, on the same skipped timesteps; all T steps when num_steps = T).
    num_steps: S, the number of sampling steps.
    eta: DDIM's stochasticity (0: deterministic DDIM, 1: DDPM-like variance). Ignored by "ddpm".
    skip: how the S timesteps are chosen out of T (see the module docstring).
  """
  kind: str = "ddim"
  num_steps: int = 100
  eta: float = 0.0
  skip: str = "uniform"

  def __post_init__(self):
    if self.kind not in SAMPLER_KINDS:
      raise ValueError(f"unknown sampler kind {self.kind!r}; choose one of {SAMPLER_KINDS}.")
    if self.skip not in SKIP_KINDS:
      raise ValueError(f"unknown timestep skipping {self.skip!r}; choose one of {SKIP_KINDS}.")
    if isinstance(self.num_steps, bool) or int(self.num_steps) != self.num_steps or self.num_steps < 1:
      raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}.")
    if not self.eta >= 0:
      raise ValueError(f"eta must be >= 0, got {self.eta!r}.")

  @property
  def stochastic(self) -> bool:
    return self.kind == "ddpm" or self.eta > 0


class Trajectory(NamedTuple):
  """The visited steps of one sampling run.

  xs: [S, B, ...] the x_t that eps_fn was called on, in visiting order.
  ts: [S] int32 timesteps, descending.
  gammas: [S] float32 gamma_t, the coefficient of eps in the update of each step.
  """
  xs: jax.Array
  ts: jax.Array
  gammas: jax.Array


def _timestep_pairs(schedule: Schedule, config: SamplerConfig) -> tuple[np.ndarray, np.ndarray]:
  """(visited t, previous t) in visiting order; previous t = -1 means alpha_bar = 1."""
  num_timesteps = schedule.num_timesteps
  steps = int(config.num_steps)
  if steps > num_timesteps:
    raise ValueError(f"num_steps ({steps}) cannot exceed the schedule's {num_timesteps} timesteps.")
  if config.skip == "quad":
    seq = [int(s) for s in np.linspace(0, np.sqrt(num_timesteps * 0.8), steps) ** 2]
    first_prev = -1
  else:
    seq = list(range(0, num_timesteps, num_timesteps // steps))
    first_prev = -1
    if config.skip == "ldm_uniform":
      seq = [s + 1 for s in seq if s + 1 < num_timesteps]
      first_prev = 0
  seq_prev = [first_prev] + seq[:-1]
  return np.asarray(seq[::-1], dtype=np.int64), np.asarray(seq_prev[::-1], dtype=np.int64)


def sampling_timesteps(schedule: Schedule, config: SamplerConfig) -> np.ndarray:
  """The timesteps the sampler visits, in visiting (descending) order."""
  return _timestep_pairs(schedule, config)[0]


def _step_coefficients(schedule: Schedule, config: SamplerConfig) -> dict[str, np.ndarray]:
  """float64 (c_x, gamma, c_noise) per visited step: x_prev = c_x x + gamma eps + c_noise z."""
  ts, prev = _timestep_pairs(schedule, config)
  abar = schedule.alphas_cumprod
  abar_t = abar[ts]
  abar_s = np.where(prev >= 0, abar[np.maximum(prev, 0)], 1.0)
  if config.kind == "ddim":
    c_noise = config.eta * np.sqrt((1 - abar_t / abar_s) * (1 - abar_s) / (1 - abar_t))
    # x_prev = sqrt(abar_s) * x0_pred + sqrt(1 - abar_s - sigma^2) * eps + sigma * z with
    # x0_pred = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t).
    c_dir = np.sqrt(np.maximum(1 - abar_s - c_noise ** 2, 0.0))
    c_x = np.sqrt(abar_s / abar_t)
    gamma = c_dir - np.sqrt(abar_s * (1 - abar_t) / abar_t)
  else:
    beta = 1 - abar_t / abar_s  # the respaced beta of this step (= beta_t when nothing is skipped)
    alpha = 1 - beta
    c_x = 1 / np.sqrt(alpha)
    gamma = -beta / (np.sqrt(alpha) * np.sqrt(1 - abar_t))
    c_noise = np.sqrt(beta * (1 - abar_s) / (1 - abar_t))  # posterior std ("fixed_small"); 0 at the end
  return {"ts": ts, "c_x": c_x, "gamma": gamma, "c_noise": c_noise}


def noise_coefficients(schedule: Schedule, config: SamplerConfig) -> np.ndarray:
  """gamma_t per visited step (float64): an error d in eps moves x_prev by gamma_t * d."""
  return _step_coefficients(schedule, config)["gamma"]


@dataclasses.dataclass(frozen=True, eq=False)
class GuidedEpsFn:
  """Classifier-free guidance: eps_u + s * (eps_c - eps_u), cond and uncond in one batched call.

  `sample` recognises this class and passes the labels to its compiled function as an argument, so
  new labels do not recompile.
  """
  eps_fn_with_labels: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
  labels: Any
  null_label: int
  guidance_scale: float

  def __call__(self, x, t):
    labels = jnp.asarray(self.labels)
    batch = x.shape[0]
    both = self.eps_fn_with_labels(
        jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0),
        jnp.concatenate([labels, jnp.full_like(labels, self.null_label)], axis=0))
    eps_cond, eps_uncond = both[:batch], both[batch:]
    return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

  def _cache_key(self):
    return (self.eps_fn_with_labels, self.null_label, float(self.guidance_scale))


def guided_eps_fn(eps_fn_with_labels, labels, null_label: int, guidance_scale: float) -> GuidedEpsFn:
  """An eps_fn(x, t) applying classifier-free guidance to a class-conditional eps function.

  Args:
    eps_fn_with_labels: (x, t, y) -> eps.
    labels: int [B], the class of each sample.
    null_label: the "no class" label the model was trained with for the unconditional branch.
    guidance_scale: s; 1 gives the plain conditional model, 0 the unconditional one.
  """
  labels = np.asarray(labels) if not isinstance(labels, jax.Array) else labels
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape [batch], got {labels.shape}.")
  return GuidedEpsFn(eps_fn_with_labels, labels, int(null_label), float(guidance_scale))


# Compiled samplers, per eps function (weakly, so they die with it) and per static choice.
_COMPILED: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()
_COMPILED_STRONG: dict = {}  # for eps functions that cannot be weakly referenced


def _build_sampler(eps_fn, *, guided_key, stochastic: bool, return_trajectory: bool, mesh):
  def run(x_T, ts, c_x, gamma, c_noise, rng, labels):
    fn = eps_fn if guided_key is None else GuidedEpsFn(eps_fn, labels, guided_key[1], guided_key[2])
    batch = x_T.shape[0]

    def step(x, inputs):
      index, t, cx, g, cn = inputs
      eps = fn(x, jnp.full((batch,), t, dtype=jnp.int32)).astype(x.dtype)
      x_prev = cx.astype(x.dtype) * x + g.astype(x.dtype) * eps
      if stochastic:
        z = jax.random.normal(jax.random.fold_in(rng, index), x.shape, x.dtype)
        x_prev = x_prev + cn.astype(x.dtype) * z
      if mesh is not None:
        x_prev = jax.lax.with_sharding_constraint(x_prev, parallel.batch_sharding(mesh))
      return x_prev, (x if return_trajectory else None)

    indices = jnp.arange(ts.shape[0], dtype=jnp.int32)
    x_0, xs = jax.lax.scan(step, x_T, (indices, ts, c_x, gamma, c_noise))
    return (x_0, xs) if return_trajectory else x_0

  if mesh is None:
    return jax.jit(run)
  batch, repl = parallel.batch_sharding(mesh), parallel.replicated_sharding(mesh)
  out = (batch, parallel.batch_sharding(mesh, 1)) if return_trajectory else batch
  return jax.jit(run, in_shardings=(batch, repl, repl, repl, repl, repl, batch), out_shardings=out)


def _compiled_sampler(eps_fn, **static):
  guided_key = eps_fn._cache_key() if isinstance(eps_fn, GuidedEpsFn) else None
  base_fn = guided_key[0] if guided_key else eps_fn
  key = tuple(sorted(static.items())) + (guided_key[1:] if guided_key else None,)
  try:
    per_fn = _COMPILED.setdefault(base_fn, {})
  except TypeError:
    per_fn = _COMPILED_STRONG.setdefault(base_fn, {})
  if key not in per_fn:
    per_fn[key] = _build_sampler(base_fn, guided_key=guided_key, **static)
  return per_fn[key]


def sample(eps_fn: EpsFn, x_T, schedule: Schedule, sampler_config: SamplerConfig, rng=None, *,
           return_trajectory: bool = False, mesh: Mesh | None = None):
  """Runs the sampler from x_T to x_0 in one jitted `lax.scan`.

  Args:
    eps_fn: (x, t) -> predicted noise, traceable; t is int32 [batch]. Closed over (not retraced per
      step); keep the same function object across calls to reuse the compiled sampler.
    x_T: [B, ...] float starting noise.
    schedule: the model's beta schedule.
    sampler_config: which sampler, how many steps, eta, timestep skipping.
    rng: a jax PRNG key; needed only when the sampler is stochastic (DDPM, or DDIM with eta > 0).
      Step i draws its noise from fold_in(rng, i).
    return_trajectory: also return the visited steps (for calibration and distillation).
    mesh: a device mesh with a "data" axis to split the batch over. Default: all devices when there
      are more than one and the batch divides evenly among them.

  Returns:
    x_0, or (x_0, Trajectory) with return_trajectory.
  """
  if not callable(eps_fn):
    raise ValueError("eps_fn must be a callable (x, t) -> eps.")
  x_T = jnp.asarray(x_T)
  if x_T.ndim < 2 or not jnp.issubdtype(x_T.dtype, jnp.floating):
    raise ValueError(f"x_T must be a float array [batch, ...], got {x_T.dtype} {x_T.shape}.")
  if sampler_config.stochastic and rng is None:
    raise ValueError(f"{sampler_config} draws noise at every step: pass a PRNG key as rng.")
  if rng is None:
    rng = jax.random.key(0)  # unused by deterministic samplers; keeps the compiled signature fixed
  coefficients = _step_coefficients(schedule, sampler_config)
  if mesh is None and jax.device_count() > 1 and x_T.shape[0] % jax.device_count() == 0:
    mesh = parallel.data_mesh()
  if mesh is not None:
    parallel._check_divisible(x_T, mesh)
  labels = jnp.asarray(eps_fn.labels) if isinstance(eps_fn, GuidedEpsFn) else jnp.zeros(
      (x_T.shape[0],), jnp.int32)
  if labels.shape[0] != x_T.shape[0]:
    raise ValueError(f"guidance labels have batch {labels.shape[0]} but x_T has batch {x_T.shape[0]}.")
  fn = _compiled_sampler(eps_fn, stochastic=sampler_config.stochastic,
                         return_trajectory=return_trajectory, mesh=mesh)
  gammas = coefficients["gamma"].astype(np.float32)
  result = fn(x_T, coefficients["ts"].astype(np.int32), coefficients["c_x"].astype(np.float32),
              gammas, coefficients["c_noise"].astype(np.float32), rng, labels)
  if not return_trajectory:
    return result
  x_0, xs = result
  return x_0, Trajectory(xs=xs, ts=jnp.asarray(coefficients["ts"], jnp.int32), gammas=jnp.asarray(gammas))
