"""The models shipped in the package load from a fresh clone, with no data present (builtin:NAME)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msfp_jax import models
from msfp_jax.diffusion import SamplerConfig, make_schedule, sample


def test_builtin_cifar10_predicts_eps_for_32x32x3_images():
  model, variables, meta = models.load("builtin:cifar10")
  cfg = meta["config"]
  assert (cfg["resolution"], cfg["in_channels"], cfg["out_channels"]) == (32, 3, 3)
  assert meta["schedule"] == {"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
  assert num_params == 2_245_763
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
  eps = model.apply(variables, x, jnp.array([0, 999], jnp.int32))
  assert eps.shape == x.shape and bool(jnp.all(jnp.isfinite(eps)))
  # A trained eps model: at t = 999 x_t is almost pure noise, so the predicted eps is close to x_t itself.
  noise = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  eps_t999 = model.apply(variables, noise, jnp.full((8,), 999, jnp.int32))
  assert float(jnp.mean((eps_t999 - noise) ** 2)) < 0.1 * float(jnp.mean(noise ** 2))


def test_builtin_cifar10_model_card_matches_the_weights():
  directory = models.resolve_model_path("builtin:cifar10")
  card = (directory / "MODEL_CARD.md").read_text()
  training = json.loads((directory / "model_config.json").read_text())["training"]
  assert f"{training['steps']:,} steps" in card and f"{training['images_seen']:,} images" in card
  assert "FP FID (N=1000, DDIM 50, eta 0):" in card
  assert "a3ef6a880db97cf6045e416e786c1e5e3186105885c6649bc5c25f5ead8b37ca" in card and "JPEG" in card


def test_builtin_cifar10_samples_in_range():
  model, variables, meta = models.load("builtin:cifar10")
  schedule = make_schedule(**meta["schedule"])
  x_T = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  out = sample(lambda x, t: model.apply(variables, x, t), x_T, schedule,
               SamplerConfig(kind="ddim", num_steps=3, eta=0.0, skip="uniform"), jax.random.key(0))
  assert out.shape == (2, 32, 32, 3) and bool(jnp.all(jnp.isfinite(out)))


def test_unknown_builtin_model_names_the_shipped_ones():
  with pytest.raises(FileNotFoundError, match="builtin:digits.*builtin:cifar10"):
    models.resolve_model_path("builtin:imagenet")
