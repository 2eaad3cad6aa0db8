"""Sampler tests against independent references: diffusers' schedulers (PyTorch), a float64 numpy
transcription of the DDIM reference code, method.md's worked example, and finite differences."""
import os
import pathlib
import subprocess
import sys
import textwrap

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_ddpm

from msfp_jax.diffusion import (
  SamplerConfig,
  guided_eps_fn,
  make_schedule,
  noise_coefficients,
  sample,
  sampling_timesteps,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHAPE = (3, 4, 4, 2)


def eps_jax(x, t):
  """A deterministic, nonlinear stand-in for a network (same formula as eps_torch)."""
  return jnp.tanh(0.7 * x + jnp.cos(t.astype(jnp.float32) / 97.0)[:, None, None, None]) * 0.9


def eps_torch(x, t):
  return torch.tanh(0.7 * x + torch.cos(torch.tensor(float(t)) / 97.0)) * 0.9


def x_T_numpy(seed=0):
  return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def step_noise(rng, index):
  """The noise `sample` draws at step `index` (its documented fold_in(rng, index) rule)."""
  return np.array(jax.random.normal(jax.random.fold_in(rng, index), SHAPE, jnp.float32))


def test_worked_example_gammas():
  """method.md section 6: linear 1e-4..0.02, T=1000, 100 uniform DDIM steps, eta 0."""
  schedule = make_schedule("linear", 1000, 1e-4, 0.02)
  config = SamplerConfig(kind="ddim", num_steps=100, eta=0.0, skip="uniform")
  ts = list(sampling_timesteps(schedule, config))
  gammas = noise_coefficients(schedule, config)
  assert ts == list(range(990, -1, -10))
  for t, expected in [(990, 0.105), (500, 0.054), (100, 0.033), (0, 0.010)]:
    assert abs(gammas[ts.index(t)]) == pytest.approx(expected, abs=6e-4)


@pytest.mark.parametrize("config", [
    SamplerConfig(kind="ddim", num_steps=20, eta=0.0),
    SamplerConfig(kind="ddim", num_steps=20, eta=0.7, skip="quad"),
    SamplerConfig(kind="ddpm", num_steps=25),
])
def test_perturbing_eps_moves_x_prev_by_gamma(config):
  """Finite difference through the real sampler: eps + d at one step moves the next x by gamma * d."""
  schedule = make_schedule("linear", 1000)
  ts = sampling_timesteps(schedule, config)
  gammas = noise_coefficients(schedule, config)
  k = 7
  d = 0.25 * np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)

  def perturbed(x, t):
    return eps_jax(x, t) + jnp.where((t == ts[k])[:, None, None, None], d, 0.0)

  rng = jax.random.key(3)
  _, base = sample(eps_jax, x_T_numpy(), schedule, config, rng, return_trajectory=True)
  _, moved = sample(perturbed, x_T_numpy(), schedule, config, rng, return_trajectory=True)
  # Earlier steps are untouched (up to float rounding of two separately compiled programs).
  np.testing.assert_allclose(np.asarray(moved.xs[: k + 1]), np.asarray(base.xs[: k + 1]), atol=1e-5)
  delta = np.asarray(moved.xs[k + 1] - base.xs[k + 1])
  np.testing.assert_allclose(delta, gammas[k] * d, rtol=1e-3, atol=2e-5)


def _ddim_scheduler(schedule_kind, **kwargs):
  return diffusers.DDIMScheduler(
      num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule=schedule_kind,
      clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading",
      prediction_type="epsilon", **kwargs)


@pytest.mark.parametrize("schedule_kind,num_steps,eta", [("linear", 100, 0.0), ("cosine", 50, 0.0),
                                                         ("linear", 40, 1.0)])
def test_ddim_matches_diffusers(schedule_kind, num_steps, eta):
  diffusers_kind = {"linear": "linear", "cosine": "squaredcos_cap_v2"}[schedule_kind]
  scheduler = _ddim_scheduler(diffusers_kind)
  scheduler.set_timesteps(num_steps)
  schedule = make_schedule(schedule_kind, 1000)
  config = SamplerConfig(kind="ddim", num_steps=num_steps, eta=eta)
  np.testing.assert_array_equal(sampling_timesteps(schedule, config), scheduler.timesteps.numpy())
  rng = jax.random.key(11)

  x = torch.from_numpy(x_T_numpy())
  for i, t in enumerate(scheduler.timesteps):
    noise = torch.from_numpy(step_noise(rng, i)) if eta > 0 else None
    x = scheduler.step(eps_torch(x, t), t, x, eta=eta, variance_noise=noise).prev_sample
  ours = sample(eps_jax, x_T_numpy(), schedule, config, rng)
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_steps", [1000, 50])
def test_ddpm_matches_diffusers(num_steps, monkeypatch):
  """Ancestral DDPM ("fixed_small" variance) against DDPMScheduler fed our noise draws."""
  rng = jax.random.key(5)
  schedule = make_schedule("linear", 1000)
  config = SamplerConfig(kind="ddpm", num_steps=num_steps)
  scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                      beta_schedule="linear", variance_type="fixed_small",
                                      clip_sample=False, prediction_type="epsilon",
                                      timestep_spacing="leading", steps_offset=0)
  scheduler.set_timesteps(num_steps)
  np.testing.assert_array_equal(sampling_timesteps(schedule, config), scheduler.timesteps.numpy())
  current = {}
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor",
                      lambda shape, **_: torch.from_numpy(step_noise(rng, current["i"])))
  x = torch.from_numpy(x_T_numpy())
  for i, t in enumerate(scheduler.timesteps):
    current["i"] = i
    x = scheduler.step(eps_torch(x, t), t, x).prev_sample
  ours = sample(eps_jax, x_T_numpy(), schedule, config, rng)
  np.testing.assert_allclose(np.asarray(ours), x.numpy(), rtol=2e-4, atol=2e-4)


def ddim_reference_float64(eps_fn, x, betas, seq, eta, noises):
  """ermongroup/ddim `generalized_steps`, transcribed to float64 numpy."""
  alphas_cumprod = np.cumprod(1 - betas)
  alpha = lambda t: 1.0 if t < 0 else alphas_cumprod[t]
  seq_next = [-1] + list(seq[:-1])
  for k, (i, j) in enumerate(zip(reversed(seq), reversed(seq_next))):
    at, at_next = alpha(i), alpha(j)
    et = eps_fn(x, i)
    x0_t = (x - et * np.sqrt(1 - at)) / np.sqrt(at)
    c1 = eta * np.sqrt((1 - at / at_next) * (1 - at_next) / (1 - at))
    c2 = np.sqrt((1 - at_next) - c1 ** 2)
    x = np.sqrt(at_next) * x0_t + c1 * noises[k] + c2 * et
  return x


@pytest.mark.parametrize("skip,num_steps,eta", [("quad", 100, 0.0), ("quad", 30, 0.5),
                                                ("uniform", 300, 0.0)])
def test_ddim_matches_reference_code(skip, num_steps, eta):
  schedule = make_schedule("linear", 1000)
  config = SamplerConfig(kind="ddim", num_steps=num_steps, eta=eta, skip=skip)
  if skip == "quad":
    seq = [int(s) for s in np.linspace(0, np.sqrt(1000 * 0.8), num_steps) ** 2]
  else:
    seq = list(range(0, 1000, 1000 // num_steps))  # 334 steps for 300: the reference's behaviour
  np.testing.assert_array_equal(sampling_timesteps(schedule, config), seq[::-1])
  rng = jax.random.key(2)
  noises = [step_noise(rng, k).astype(np.float64) for k in range(len(seq))]
  eps64 = lambda x, t: np.tanh(0.7 * x + np.cos(t / 97.0)) * 0.9
  expected = ddim_reference_float64(eps64, x_T_numpy().astype(np.float64), schedule.betas, seq, eta, noises)
  ours = sample(eps_jax, x_T_numpy(), schedule, config, rng)
  np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-4, atol=1e-4)


def test_trajectory_contents_and_no_retrace():
  traces = []

  def eps_counting(x, t):
    traces.append(1)
    return eps_jax(x, t)

  schedule = make_schedule("cosine", 1000)
  config = SamplerConfig(kind="ddim", num_steps=10, eta=0.3)
  x_T = x_T_numpy()
  x_0, traj = sample(eps_counting, x_T, schedule, config, jax.random.key(0), return_trajectory=True)
  assert traj.xs.shape == (10,) + SHAPE
  np.testing.assert_array_equal(np.asarray(traj.xs[0]), x_T)
  np.testing.assert_array_equal(np.asarray(traj.ts), sampling_timesteps(schedule, config))
  np.testing.assert_allclose(np.asarray(traj.gammas), noise_coefficients(schedule, config), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(sample(eps_counting, x_T, schedule, config, jax.random.key(0))),
                                np.asarray(x_0))
  n = len(traces)
  # Another eta and schedule reuse the compiled trajectory: the coefficients are arguments.
  sample(eps_counting, x_T, make_schedule("linear", 1000), SamplerConfig(num_steps=10, eta=0.9),
         jax.random.key(1))
  assert len(traces) == n


def test_guided_eps_fn_batches_cond_and_uncond():
  calls = []
  null = 10

  def eps_with_labels(x, t, y):
    calls.append(x.shape[0])
    return jnp.tanh(x + y.astype(jnp.float32)[:, None, None, None] / 10 + t[:, None, None, None] / 1000)

  labels = np.array([1, 4, 7])
  x = jnp.asarray(x_T_numpy())
  t = jnp.full((3,), 500, jnp.int32)
  fn = guided_eps_fn(eps_with_labels, labels, null, 3.0)
  got = fn(x, t)
  assert calls == [6]
  cond = eps_with_labels(x, t, jnp.asarray(labels))
  uncond = eps_with_labels(x, t, jnp.full((3,), null))
  np.testing.assert_allclose(np.asarray(got), np.asarray(uncond + 3.0 * (cond - uncond)), rtol=1e-6, atol=1e-6)
  # Through the sampler; new labels reuse the compiled sampler (labels are an argument).
  schedule = make_schedule("linear", 1000)
  config = SamplerConfig(num_steps=5)
  out1 = sample(fn, x, schedule, config)
  n = len(calls)
  out2 = sample(guided_eps_fn(eps_with_labels, labels[::-1].copy(), null, 3.0), x, schedule, config)
  assert len(calls) == n
  assert not np.allclose(np.asarray(out1), np.asarray(out2))
  manual = sample(lambda x, t: guided_eps_fn(eps_with_labels, labels[::-1].copy(), null, 3.0)(x, t), x,
                  schedule, config)
  np.testing.assert_allclose(np.asarray(out2), np.asarray(manual), rtol=1e-5, atol=1e-6)


def _linear():
  return make_schedule("linear", 1000)


# What the error names -> a call that must raise it.
BAD_INPUTS = {
    "sampler kind": lambda: SamplerConfig(kind="euler"),
    "skipping": lambda: SamplerConfig(skip="log"),
    "num_steps": lambda: SamplerConfig(num_steps=0),
    "exceed": lambda: sampling_timesteps(_linear(), SamplerConfig(num_steps=2000)),
    "rng": lambda: sample(eps_jax, x_T_numpy(), _linear(), SamplerConfig(kind="ddpm", num_steps=10)),
    "x_T": lambda: sample(eps_jax, np.zeros((3,), np.int32), _linear(), SamplerConfig(num_steps=10)),
    "schedule kind": lambda: make_schedule("sigmoid"),
    "beta_start": lambda: make_schedule("linear", beta_start=0.1, beta_end=0.01),
}


@pytest.mark.parametrize("match", BAD_INPUTS)
def test_bad_input(match):
  with pytest.raises(ValueError, match=match):
    BAD_INPUTS[match]()


SHARDED_SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from msfp_jax import parallel
    from msfp_jax.diffusion import SamplerConfig, make_schedule, sample
    assert jax.device_count() == 8
    kernel = np.random.default_rng(0).standard_normal((3, 3, 2, 2)).astype(np.float32) * 0.3
    def eps_fn(x, t):  # a convolution mixes pixels, so a wrong sharding would show
      y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return jnp.tanh(y + t[:, None, None, None] / 1000.0)
    x_T = np.random.default_rng(1).standard_normal((16, 4, 4, 2)).astype(np.float32)
    schedule = make_schedule("linear", 1000)
    config = SamplerConfig(kind="ddim", num_steps=20, eta=0.5)
    rng = jax.random.key(4)
    sharded, traj = sample(eps_fn, x_T, schedule, config, rng, return_trajectory=True)
    assert len(sharded.sharding.device_set) == 8, sharded.sharding
    assert sharded.sharding.spec[0] == "data", sharded.sharding
    auto = sample(eps_fn, x_T, schedule, config, rng)  # default mesh: all 8 devices
    single = sample(eps_fn, x_T, schedule, config, rng, mesh=parallel.data_mesh(jax.devices()[:1]))
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(sharded))
    try:
      sample(eps_fn, x_T[:12], schedule, config, rng, mesh=parallel.data_mesh())
      raise SystemExit("no error for a batch that does not divide")
    except ValueError as e:
      assert "multiple" in str(e)
    print("SHARDED_OK")
""")


def test_sharded_sampling_on_8_simulated_devices(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and "SHARDED_OK" in result.stdout, result.stdout + result.stderr
