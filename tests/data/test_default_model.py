"""The shipped default model loads and denoises held-out digits far better than chance."""

import jax
import numpy as np

from msfp_jax.data import default_model_path, digits
from msfp_jax.diffusion import make_schedule
from msfp_jax.models import load


def test_shipped_default_model_predicts_noise_on_held_out_digits():
  path = default_model_path()
  assert (path / "MODEL_CARD.md").is_file()
  model, variables, meta = load(path)
  assert sum(x.size for x in jax.tree.leaves(variables)) == 649329
  schedule = make_schedule(**meta["schedule"])
  # Held-out images straight from sklearn (the builder's own split rule), no tfds preparation needed.
  images, _ = digits.upscaled_digits()
  x0 = images[digits.split_indices()["test"][:32]]
  rng = np.random.default_rng(0)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  for t in (50, 300, 700):
    abar = schedule.alphas_cumprod[t]
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    eps = np.asarray(model.apply(variables, x_t.astype(np.float32), np.full((32,), t, np.int32)))
    # Predicting zero scores 1.0; the trained model must be far better on data it never saw.
    assert np.mean((eps - noise) ** 2) < 0.2, t
