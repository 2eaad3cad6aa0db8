"""Paired metrics against the FP model: PSNR, teacher-forced per-step eps errors, their plot.

References: the textbook PSNR written out per image in float64, and eps functions whose errors are known in
closed form.
"""
import math

import numpy as np
import pytest

from msfp_jax.evaluation import paired


def test_psnr_is_of_the_mse_over_all_samples_on_the_minus_one_to_one_range():
  rng = np.random.default_rng(0)
  reference = rng.uniform(-1, 1, size=(3, 4, 4, 3))
  noisy = reference + rng.normal(size=reference.shape) * np.array([0.01, 0.1, 0.3])[:, None, None, None]
  mse = sum(float(np.sum((a - b) ** 2)) for a, b in zip(noisy.ravel(), reference.ravel())) / noisy.size
  assert paired.psnr(noisy, reference) == pytest.approx(10 * math.log10(4.0 / mse), rel=1e-12)
  assert paired.psnr(reference, reference) == math.inf
  # One sample equal to its reference (a saturated sample of both models) leaves the PSNR finite.
  noisy[0] = reference[0]
  assert math.isfinite(paired.psnr(noisy, reference))
  assert paired.psnr_from_mse(0.04) == pytest.approx(20.0) and paired.psnr_from_mse(0.0) == math.inf
  with pytest.raises(ValueError, match="same shape"):
    paired.psnr(noisy[:2], reference)


def test_per_step_errors_are_the_eps_mse_and_its_gamma_squared_weighting():
  xs = np.random.default_rng(1).normal(size=(3, 2, 4, 4, 1)).astype(np.float32)
  ts, gammas = np.array([900, 500, 100]), np.array([-0.5, -0.2, -0.05])
  fp = lambda x, t: x * 0.5
  offsets = {"a": lambda x, t: x * 0.5 + 0.1, "b": lambda x, t: x * 0.5 + (t[:, None, None, None] / 1000.0)}
  errors = paired.per_step_eps_errors(offsets, fp, xs, ts, gammas)
  assert errors["t"] == [900, 500, 100] and errors["gamma"] == pytest.approx(list(gammas))
  np.testing.assert_allclose(errors["a"]["eps_mse"], [0.01] * 3, rtol=1e-5)
  np.testing.assert_allclose(errors["b"]["eps_mse"], (ts / 1000.0) ** 2, rtol=1e-5)
  np.testing.assert_allclose(errors["b"]["x_prev_mse"], gammas ** 2 * (ts / 1000.0) ** 2, rtol=1e-5)
  with pytest.raises(ValueError, match="one entry per step"):
    paired.per_step_eps_errors(offsets, fp, xs, ts[:2], gammas)


def test_the_per_step_plot_is_written(tmp_path):
  errors = {"t": [900, 100], "gamma": [-0.5, -0.1], "ptq": {"eps_mse": [0.1, 0.2], "x_prev_mse": [0.025, 0.002]}}
  path = paired.plot_per_step_errors(errors, tmp_path / "e.png", title="x")
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_swap_in_costs_match_a_sampler_whose_errors_add_up_in_closed_form():
  import jax.numpy as jnp
  ts, gammas = np.array([900, 700, 500, 300, 100]), np.array([-0.4, -0.3, -0.2, -0.1, -0.05])
  offsets = {900: 1.0, 700: 2.0, 500: -1.0, 300: 0.5, 100: 3.0}

  def sample_with(eps_fn):  # x_prev = x + gamma_t eps: an eps error d moves x_0 by gamma_t d
    x = jnp.zeros((2, 3))
    for t, g in zip(ts, gammas):
      x = x + g * eps_fn(x, jnp.full((2,), t, jnp.int32))
    return x
  reference = lambda x, t: jnp.zeros_like(x)
  candidate = lambda x, t: jnp.full_like(x, 1.0) * jnp.asarray([offsets[k] for k in ts])[
      jnp.argmax(jnp.asarray(ts) == t[0])]
  costs = paired.swap_in_costs(sample_with, reference, candidate, ts, gammas, block_size=2)
  blocks = costs["blocks"]
  assert [(b["t_max"], b["t_min"], b["steps"]) for b in blocks] == [(900, 700, 2), (500, 300, 2), (100, 100, 1)]
  want = [(-0.4 * 1.0 - 0.3 * 2.0) ** 2, (-0.2 * -1.0 - 0.1 * 0.5) ** 2, (-0.05 * 3.0) ** 2]
  np.testing.assert_allclose([b["sample_mse"] for b in blocks], want, rtol=1e-5)
  np.testing.assert_allclose([b["cost_share"] for b in blocks], np.asarray(want) / sum(want), rtol=1e-5)
  total = sum(-g * offsets[t] for t, g in zip(ts, gammas))
  assert costs["all_steps_mse"] == pytest.approx(total ** 2, rel=1e-5)
  share = blocks[0]["weight_share"]
  assert share["abs"] == pytest.approx(0.7 / 1.05) and share["square"] == pytest.approx(0.25 / 0.3025)
  assert share["none"] == pytest.approx(0.4)
