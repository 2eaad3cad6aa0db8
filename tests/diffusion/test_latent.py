"""Latent sampling: guided DDIM in latent space and decoding, against a step-by-step reference written here.

The reference runs the UNet separately on the conditional and the null labels (no batching), combines
eps_u + s (eps_c - eps_u), applies the DDIM (eta = 0) update in float64 numpy from the schedule's
alphas_cumprod, divides by the scale factor and decodes with the first stage. The library path batches
cond + uncond through msfp_jax.diffusion's sampler and loads everything from a converted directory.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

from msfp_jax import models
from msfp_jax.diffusion import SamplerConfig, latent, make_schedule
from msfp_jax.models import autoencoder, save_converted
from msfp_jax.models.autoencoder import AutoencoderConfig
from msfp_jax.models.ldm_unet import LDMUNet, LDMUNetConfig, init_shapes, load_first_stage

jax.config.update("jax_default_matmul_precision", "highest")

UNET = LDMUNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(2,), num_heads=1, use_spatial_transformer=True, context_dim=16,
                     context_classes=11, image_size=4)
FIRST_STAGE = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=8, z_channels=3,
                                embed_dim=3, n_embed=16)
SCALE_FACTOR = 0.7
SCHEDULE = {"kind": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0195, "num_timesteps": 1000}


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def random_params(shapes, seed):
  """Random parameters for a shape tree, made in numpy (no compilation): kernels N(0, 1/fan_in), norm scales
  N(1, 0.1), biases N(0, 0.1), embeddings N(0, 1)."""
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == "scale":
      value = 1 + 0.1 * rng.standard_normal(leaf.shape)
    elif name == "bias":
      value = 0.1 * rng.standard_normal(leaf.shape)
    else:
      value = rng.standard_normal(leaf.shape)
    return value.astype(np.float32)
  return jax.tree_util.tree_map_with_path(make, shapes)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  unet = LDMUNet(UNET)
  unet_params = random_params(init_shapes(UNET)["params"], 1)
  fs = autoencoder.build("vq_f4", FIRST_STAGE)
  fs_params = random_params(autoencoder.init_shapes("vq_f4", FIRST_STAGE)["params"], 3)
  dst = tmp_path_factory.mktemp("ldm")
  save_converted(dst, "ldm_unet", UNET.to_dict(), unet_params, extra_trees={"first_stage_params": fs_params},
                 extra_config={"first_stage": {"architecture": "vq_f4", "config": FIRST_STAGE.to_dict(),
                                               "scale_factor": SCALE_FACTOR},
                               "conditioning": {"kind": "class", "num_classes": 10, "null_class": 10},
                               "schedule": SCHEDULE})
  return dst, unet, {"params": unet_params}, fs, {"params": fs_params}


def test_balanced_class_labels():
  labels = latent.balanced_class_labels(10, 3)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 3))
  shuffled = latent.balanced_class_labels(10, 3, seed=5)
  np.testing.assert_array_equal(np.bincount(shuffled, minlength=10), np.full(10, 3))
  assert not np.array_equal(shuffled, labels)
  np.testing.assert_array_equal(shuffled, latent.balanced_class_labels(10, 3, seed=5))
  with pytest.raises(ValueError, match="per_class"):
    latent.balanced_class_labels(10, 0)


def test_guided_latent_ddim_and_decode_match_stepwise_reference(converted):
  dst, unet, unet_vars, fs, fs_vars = converted
  ldm = latent.LatentDiffusion.from_loaded(models.load(dst), load_first_stage(dst))
  assert ldm.latent_shape == (4, 4, 3) and ldm.num_classes == 10 and ldm.null_label == 10
  assert ldm.scale_factor == SCALE_FACTOR

  sampler = SamplerConfig(kind="ddim", num_steps=4, eta=0.0, skip="uniform")
  labels = np.array([3, 9, 0], np.int32)
  x_T = np.random.default_rng(0).standard_normal((3, 4, 4, 3)).astype(np.float32)
  scale = 2.5
  latents = np.asarray(ldm.sample_latents(x_T, sampler, labels=labels, guidance_scale=scale))
  images = np.asarray(ldm.decode(latents))

  # Reference: DDIM (eta 0) with timesteps 750, 500, 250, 0 -> alpha_bar 1 at the end.
  abar = make_schedule(SCHEDULE["kind"], 1000, SCHEDULE["beta_start"], SCHEDULE["beta_end"]).alphas_cumprod
  apply = jax.jit(unet.apply)
  x = x_T.astype(np.float64)
  seq = [0, 250, 500, 750]
  for i in reversed(range(len(seq))):
    t = np.full((3,), seq[i], np.int32)
    xf = x.astype(np.float32)
    eps_c = np.asarray(apply(unet_vars, xf, t, labels), np.float64)
    eps_u = np.asarray(apply(unet_vars, xf, t, np.full((3,), 10, np.int32)), np.float64)
    eps = eps_u + scale * (eps_c - eps_u)
    a_t = abar[seq[i]]
    a_s = abar[seq[i - 1]] if i > 0 else 1.0
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    x = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * eps
  assert relative_error(latents, x) <= 1e-4
  decode = jax.jit(lambda v, z: fs.apply(v, z, method="decode"))
  ref_images = np.clip(np.asarray(decode(fs_vars, (x / SCALE_FACTOR).astype(np.float32))), -1, 1)
  assert images.shape == (3, 8, 8, 3)
  assert relative_error(images, ref_images) <= 1e-4

  # Guidance matters: scale 1 (plain conditional) gives other latents.
  plain = np.asarray(ldm.sample_latents(x_T, sampler, labels=labels, guidance_scale=1.0))
  assert relative_error(plain, latents) > 1e-3

  # generate(): noise from the key, same pipeline.
  generated = ldm.generate(jax.random.key(1), sampler, labels=labels, guidance_scale=scale)
  assert generated.shape == (3, 8, 8, 3) and np.all(np.abs(np.asarray(generated)) <= 1)


def test_decode_without_codebook_lookup(converted):
  _, _, _, fs, fs_vars = converted
  z = np.random.default_rng(2).standard_normal((2, 4, 4, 3)).astype(np.float32)
  raw = latent.decode_latents(fs, fs_vars, z, scale_factor=2.0, force_not_quantize=True)
  ref = np.clip(np.asarray(jax.jit(lambda v, x: fs.apply(v, x, True, method="decode"))(fs_vars, z / 2.0)), -1, 1)
  assert relative_error(raw, ref) <= 1e-4


def test_bad_inputs_give_clear_errors(converted):
  ldm = latent.LatentDiffusion.from_loaded(models.load(converted[0]), load_first_stage(converted[0]))
  sampler = SamplerConfig(num_steps=2)
  x_T = np.zeros((2, 4, 4, 3), np.float32)
  with pytest.raises(ValueError, match="class label out of range"):
    ldm.sample_latents(x_T, sampler, labels=[1, 10], guidance_scale=3.0)
  with pytest.raises(ValueError, match="class label out of range"):
    ldm.sample_latents(x_T, sampler, labels=[-1, 2], guidance_scale=3.0)
  with pytest.raises(ValueError, match="guidance_scale must be a number"):
    ldm.sample_latents(x_T, sampler, labels=[1, 2], guidance_scale="3.0")
  with pytest.raises(ValueError, match="guidance_scale must be a number"):
    ldm.sample_latents(x_T, sampler, labels=[1, 2], guidance_scale=None)
  with pytest.raises(ValueError, match="finite"):
    ldm.sample_latents(x_T, sampler, labels=[1, 2], guidance_scale=float("nan"))
  with pytest.raises(ValueError, match="pass labels"):
    ldm.sample_latents(x_T, sampler, guidance_scale=3.0)
  with pytest.raises(ValueError, match="2 labels for a batch of 3"):
    ldm.sample_latents(np.zeros((3, 4, 4, 3), np.float32), sampler, labels=[1, 2], guidance_scale=3.0)
  with pytest.raises(ValueError, match="integers"):
    ldm.sample_latents(x_T, sampler, labels=[1.5, 2.0], guidance_scale=3.0)
  with pytest.raises(ValueError, match="unconditional"):
    latent.latent_eps_fn(lambda x, t: x, labels=[1, 2])
  with pytest.raises(ValueError, match="scale_factor"):
    latent.decode_latents(ldm.first_stage, ldm.first_stage_variables, x_T, scale_factor=0.0)
