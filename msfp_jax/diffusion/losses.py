"""The DFA (denoising-factor alignment) distillation loss, method.md section 6.

L_t = w(gamma_t) * mean((eps_q(x_t, t) - eps_fp(x_t, t))^2), where gamma_t is the coefficient of the
predicted noise in the sampler update (`noise_coefficients`): an error d in eps moves x_{t-1} by
gamma_t * d, so errors at steps where gamma_t is large cost more.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WEIGHTINGS = ("abs", "square", "none")


def _check_weighting(weighting: str) -> None:
  if weighting not in WEIGHTINGS:
    raise ValueError(f"unknown DFA weighting {weighting!r}; choose one of {WEIGHTINGS}.")


def gamma_normalizer(gammas, weighting: str = "abs") -> float:
  """The mean of w over the sampler's visited steps, so that the normalized weight has mean 1.

  Args:
    gammas: gamma_t of every visited step (from `noise_coefficients`).
    weighting: "abs" -> mean |gamma|, "square" -> mean gamma^2, "none" -> 1.
  """
  _check_weighting(weighting)
  gammas = np.asarray(gammas, dtype=np.float64)
  if weighting == "none":
    return 1.0
  if gammas.size == 0:
    raise ValueError("gamma_normalizer needs the gammas of at least one step.")
  value = float(np.mean(np.abs(gammas)) if weighting == "abs" else np.mean(gammas ** 2))
  if not value > 0:
    raise ValueError("every gamma is 0: the DFA weight is undefined; use weighting='none'.")
  return value


def dfa_weight(gamma, *, weighting: str = "abs", gamma_normalizer: float | None = None):
  """w(gamma): |gamma| / normalizer, gamma^2 / normalizer, or 1."""
  _check_weighting(weighting)
  gamma = jnp.asarray(gamma, jnp.float32)
  if weighting == "none":
    return jnp.ones_like(gamma)
  if gamma_normalizer is None:
    raise ValueError(
        f"weighting={weighting!r} needs gamma_normalizer: compute it once with "
        "gamma_normalizer(noise_coefficients(schedule, sampler_config), weighting).")
  raw = jnp.abs(gamma) if weighting == "abs" else jnp.square(gamma)
  return raw / gamma_normalizer


def dfa_loss(eps_student, eps_teacher, gamma, *, weighting: str = "abs",
             gamma_normalizer: float | None = None):
  """w(gamma_t) * mean((eps_student - eps_teacher)^2).

  Args:
    eps_student: [B, ...] the quantized model's prediction.
    eps_teacher: [B, ...] the full-precision model's prediction on the same x_t (no gradient flows
      into it: it is wrapped in stop_gradient).
    gamma: a scalar (all samples at one step) or [B] (one gamma per sample).
    weighting: "abs" (default), "square" or "none" (plain MSE, the ablation baseline).
    gamma_normalizer: mean |gamma| ("abs") or mean gamma^2 ("square") over the visited steps; see
      `gamma_normalizer`. Unused for "none".

  Returns:
    A float32 scalar: the mean over the batch of each sample's weight times its mean squared error.
  """
  eps_student = jnp.asarray(eps_student)
  eps_teacher = jnp.asarray(eps_teacher)
  if eps_student.shape != eps_teacher.shape:
    raise ValueError(f"student and teacher eps differ in shape: {eps_student.shape} vs {eps_teacher.shape}.")
  if eps_student.ndim < 1:
    raise ValueError("eps must have a batch axis.")
  weight = dfa_weight(gamma, weighting=weighting, gamma_normalizer=gamma_normalizer)
  if weight.ndim > 1 or (weight.ndim == 1 and weight.shape[0] != eps_student.shape[0]):
    raise ValueError(f"gamma must be a scalar or have shape [batch={eps_student.shape[0]}], got {weight.shape}.")
  diff = eps_student.astype(jnp.float32) - jax.lax.stop_gradient(eps_teacher.astype(jnp.float32))
  per_sample = jnp.mean(jnp.square(diff).reshape(diff.shape[0], -1), axis=1)
  return jnp.mean(weight * per_sample)

