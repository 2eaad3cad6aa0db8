"""The Flax first stages (VQ-f4 and KL-f8 layouts) against diffusers' VQModel / AutoencoderKL.

Random weights are made here in diffusers models of small LDM-like configurations; an inverse mapping
written here renames them into the CompVis `first_stage_model.*` layout, and diffusers' own
single-file converter (`convert_ldm_vae_checkpoint`) must map that dict back onto exactly the diffusers
state dict. The Flax models converted from the CompVis dict must reproduce diffusers' encodings and
decoded images (VQ: with and without the codebook lookup) to 1e-4 relative error in float32.
"""
from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest
import torch

from msfp_jax.models import autoencoder
from msfp_jax.models.autoencoder import AutoencoderConfig
from msfp_jax.models.convert.common import convert_state_dict
from msfp_jax.models.convert.compvis import first_stage_torch_module

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from reference_helpers import randomize_, relative_error  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

VQ_CONFIG = AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=16,
                              in_channels=3, out_ch=3, z_channels=3, double_z=False, embed_dim=3, n_embed=16)
KL_CONFIG = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=16,
                              in_channels=3, out_ch=3, z_channels=4, double_z=True, embed_dim=4)


_RESNET = {"conv_shortcut": "nin_shortcut"}
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_vae_to_compvis(sd: dict, num_levels: int) -> dict:
  """diffusers VQModel / AutoencoderKL state dict -> CompVis first-stage keys (without the prefix)."""
  out = {}
  for key, value in sd.items():
    parts = key.split(".")
    leaf = parts[-1]
    if parts[0] in ("encoder", "decoder") and parts[1] in ("down_blocks", "up_blocks"):
      i = int(parts[2])
      level = i if parts[1] == "down_blocks" else num_levels - 1 - i  # diffusers' decoder runs top-down
      name = "down" if parts[1] == "down_blocks" else "up"
      if parts[3] == "resnets":
        layer = _RESNET.get(parts[5], parts[5])
        out[f"{parts[0]}.{name}.{level}.block.{parts[4]}.{layer}.{leaf}"] = value
      else:  # downsamplers.0.conv / upsamplers.0.conv
        resample = "downsample" if name == "down" else "upsample"
        out[f"{parts[0]}.{name}.{level}.{resample}.conv.{leaf}"] = value
    elif parts[0] in ("encoder", "decoder") and parts[1] == "mid_block":
      if parts[2] == "resnets":
        layer = _RESNET.get(parts[4], parts[4])
        out[f"{parts[0]}.mid.block_{int(parts[3]) + 1}.{layer}.{leaf}"] = value
      else:  # attentions.0.<module>
        module = ".".join(parts[4:-1])
        if value.ndim == 2:  # diffusers Linear -> CompVis 1x1 Conv2d
          value = value[:, :, None, None]
        out[f"{parts[0]}.mid.attn_1.{_ATTN[module]}.{leaf}"] = value
    elif parts[0] in ("encoder", "decoder"):
      module = {"conv_norm_out": "norm_out"}.get(parts[1], parts[1])
      out[f"{parts[0]}.{module}.{leaf}"] = value
    elif parts[0] in ("quant_conv", "post_quant_conv") or key == "quantize.embedding.weight":
      out[key] = value
    else:
      raise KeyError(f"unmapped diffusers key {key}")
  return out


def make_first_stage(architecture: str, cfg: AutoencoderConfig, seed: int = 0):
  """(diffusers model, CompVis state dict with the first_stage_model. prefix)."""
  from diffusers import AutoencoderKL, VQModel
  from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
  channels = tuple(cfg.ch * m for m in cfg.ch_mult)
  common = dict(in_channels=cfg.in_channels, out_channels=cfg.out_ch, block_out_channels=channels,
                layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels,
                down_block_types=("DownEncoderBlock2D",) * len(channels),
                up_block_types=("UpDecoderBlock2D",) * len(channels), sample_size=cfg.resolution)
  torch.manual_seed(seed)
  if architecture == "vq_f4":
    model = VQModel(num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim, **common).eval()
  else:
    assert cfg.embed_dim == cfg.z_channels  # diffusers' AutoencoderKL has one latent width
    model = AutoencoderKL(**common).eval()
  randomize_(model, seed, unit_normal=("quantize.embedding.weight",))
  diffusers_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  compvis = {"first_stage_model." + k: v for k, v in diffusers_vae_to_compvis(diffusers_sd, len(channels)).items()}
  back = convert_ldm_vae_checkpoint(dict(compvis), {"down_block_types": common["down_block_types"],
                                                    "up_block_types": common["up_block_types"]})
  # diffusers' converter has no codebook entry; every other key must come back exactly.
  expected = {k: v for k, v in diffusers_sd.items() if k != "quantize.embedding.weight"}
  assert sorted(back) == sorted(expected)
  for key, value in expected.items():
    assert torch.equal(back[key], value), key
  if architecture == "vq_f4":
    assert torch.equal(compvis["first_stage_model.quantize.embedding.weight"],
                       diffusers_sd["quantize.embedding.weight"])
  return model, compvis


def flax_first_stage(architecture: str, cfg: AutoencoderConfig, compvis: dict):
  target = autoencoder.init_shapes(architecture, cfg)["params"]
  params = convert_state_dict({k: v.numpy() for k, v in compvis.items()}, target, first_stage_torch_module)
  return autoencoder.build(architecture, cfg), {"params": params}


def _nchw(a):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def test_vq_autoencoder_matches_diffusers_vqmodel():
  model, compvis = make_first_stage("vq_f4", VQ_CONFIG, seed=0)
  flax_model, variables = flax_first_stage("vq_f4", VQ_CONFIG, compvis)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (2, 16, 12, 3)).astype(np.float32)  # non-square
  latents = (2.0 * rng.standard_normal((2, 8, 6, 3))).astype(np.float32)

  encode = jax.jit(lambda v, x: flax_model.apply(v, x, method="encode"))
  decode = jax.jit(lambda v, z: flax_model.apply(v, z, method="decode"))
  decode_raw = jax.jit(lambda v, z: flax_model.apply(v, z, True, method="decode"))
  with torch.no_grad():
    ref_h = _nhwc(model.encode(_nchw(images)).latents)
    ref_dec = _nhwc(model.decode(_nchw(latents)).sample)
    ref_raw = _nhwc(model.decode(_nchw(latents), force_not_quantize=True).sample)
  assert relative_error(encode(variables, images), ref_h) <= 1e-4
  quantized = np.asarray(decode(variables, latents))
  assert relative_error(quantized, ref_dec) <= 1e-4
  assert relative_error(decode_raw(variables, latents), ref_raw) <= 1e-4
  # The codebook lookup changes the image (the latents are not codebook entries).
  assert relative_error(quantized, ref_raw) > 1e-2


def test_codebook_lookup_is_the_nearest_entry():
  codebook = np.random.default_rng(3).standard_normal((16, 3)).astype(np.float32)
  z = np.random.default_rng(4).standard_normal((2, 5, 4, 3)).astype(np.float32)
  idx = np.asarray(autoencoder.VectorQuantizer.indices(z, codebook))
  d = ((z.astype(np.float64)[..., None, :] - codebook.astype(np.float64)) ** 2).sum(-1)
  np.testing.assert_array_equal(idx, d.argmin(-1))


def test_kl_autoencoder_matches_diffusers_autoencoderkl():
  model, compvis = make_first_stage("kl_f8", KL_CONFIG, seed=1)
  flax_model, variables = flax_first_stage("kl_f8", KL_CONFIG, compvis)
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, (2, 16, 8, 3)).astype(np.float32)
  latents = rng.standard_normal((2, 4, 2, 4)).astype(np.float32)
  mean, logvar = jax.jit(lambda v, x: flax_model.apply(v, x, method="encode"))(variables, images)
  decoded = jax.jit(lambda v, z: flax_model.apply(v, z, method="decode"))(variables, latents)
  with torch.no_grad():
    dist = model.encode(_nchw(images)).latent_dist
    ref_dec = _nhwc(model.decode(_nchw(latents)).sample)
  assert relative_error(mean, _nhwc(dist.mean)) <= 1e-4
  assert relative_error(logvar, _nhwc(dist.logvar)) <= 1e-4
  assert relative_error(decoded, ref_dec) <= 1e-4


def test_module_names_mirror_compvis_keys():
  params = autoencoder.init_shapes("vq_f4", VQ_CONFIG)["params"]
  assert set(params) == {"encoder", "decoder", "quant_conv", "post_quant_conv", "quantize"}
  assert set(params["encoder"]["mid"]) == {"block_1", "attn_1", "block_2"}
  assert set(params["encoder"]["down_0"]) == {"block_0", "downsample"}
  assert first_stage_torch_module(("encoder", "down_0", "block_0", "norm1")) == \
      "first_stage_model.encoder.down.0.block.0.norm1"
  assert first_stage_torch_module(("decoder", "mid", "attn_1", "q")) == "first_stage_model.decoder.mid.attn_1.q"
  assert first_stage_torch_module(("quantize",)) == "first_stage_model.quantize.embedding"


def test_bad_configs():
  with pytest.raises(ValueError, match="n_embed"):
    autoencoder.init_shapes("vq_f4", KL_CONFIG)
  with pytest.raises(ValueError, match="double_z"):
    autoencoder.init_shapes("kl_f8", VQ_CONFIG)
  with pytest.raises(ValueError, match="unknown first-stage architecture"):
    autoencoder.build("vq_f16", VQ_CONFIG)
