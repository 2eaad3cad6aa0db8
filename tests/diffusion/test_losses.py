"""DFA loss against a float64 numpy transcription of method.md section 6."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msfp_jax.diffusion import SamplerConfig, dfa_loss, gamma_normalizer, make_schedule, noise_coefficients


def numpy_dfa(student, teacher, gamma, weighting, gammas_all):
  student, teacher = np.float64(student), np.float64(teacher)
  gamma = np.broadcast_to(np.float64(gamma), (student.shape[0],))
  if weighting == "abs":
    w = np.abs(gamma) / np.mean(np.abs(gammas_all))
  elif weighting == "square":
    w = gamma ** 2 / np.mean(gammas_all ** 2)
  else:
    w = np.ones_like(gamma)
  mse = ((student - teacher) ** 2).reshape(student.shape[0], -1).mean(axis=1)
  return float(np.mean(w * mse))


@pytest.mark.parametrize("weighting", ["abs", "square", "none"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_dfa_loss_matches_numpy(weighting, per_sample):
  rng = np.random.default_rng(0)
  student = rng.standard_normal((4, 5, 5, 3)).astype(np.float32)
  teacher = rng.standard_normal((4, 5, 5, 3)).astype(np.float32)
  gammas_all = noise_coefficients(make_schedule("linear", 1000), SamplerConfig(num_steps=100))
  gamma = gammas_all[[3, 40, 77, 99]] if per_sample else gammas_all[12]
  normalizer = gamma_normalizer(gammas_all, weighting)
  got = dfa_loss(student, teacher, gamma, weighting=weighting, gamma_normalizer=normalizer)
  assert float(got) == pytest.approx(numpy_dfa(student, teacher, gamma, weighting, gammas_all), rel=1e-5)


def test_normalized_abs_weight_has_mean_one_over_steps():
  gammas_all = noise_coefficients(make_schedule("cosine", 1000), SamplerConfig(num_steps=50, skip="quad"))
  normalizer = gamma_normalizer(gammas_all, "abs")
  rng = np.random.default_rng(1)
  student = rng.standard_normal((1, 8)).astype(np.float32)
  teacher = student + 1.0  # MSE exactly 1 per step
  losses = [float(dfa_loss(student, teacher, g, gamma_normalizer=normalizer)) for g in gammas_all]
  assert np.mean(losses) == pytest.approx(1.0, rel=1e-5)


def test_gradient_flows_to_student_only():
  student = jnp.ones((2, 3)) * 2.0
  teacher = jnp.zeros((2, 3))
  g_student, g_teacher = jax.grad(
      lambda s, t: dfa_loss(s, t, 0.5, weighting="abs", gamma_normalizer=0.25), argnums=(0, 1))(student, teacher)
  # d/ds of 2 * mean((s - t)^2) = 2 * 2 (s - t) / 6 per element (mean over 3 elements and 2 samples).
  np.testing.assert_allclose(np.asarray(g_student), np.full((2, 3), 2 * 2 * 2.0 / 6), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(g_teacher), np.zeros((2, 3)))


def test_bad_input():
  x = np.zeros((2, 3), np.float32)
  with pytest.raises(ValueError, match="weighting"):
    dfa_loss(x, x, 0.1, weighting="log", gamma_normalizer=1.0)
  with pytest.raises(ValueError, match="gamma_normalizer"):
    dfa_loss(x, x, 0.1, weighting="abs")
  with pytest.raises(ValueError, match="shape"):
    dfa_loss(x, np.zeros((2, 4), np.float32), 0.1, weighting="none")
  with pytest.raises(ValueError, match="gamma must be"):
    dfa_loss(x, x, np.ones(3), weighting="abs", gamma_normalizer=1.0)
  with pytest.raises(ValueError, match="every gamma is 0"):
    gamma_normalizer(np.zeros(4), "abs")
