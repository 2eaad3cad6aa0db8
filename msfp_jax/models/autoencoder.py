"""The latent-diffusion first stages in Flax: VQ-f4 (VQModelInterface) and KL-f8 (AutoencoderKL).

Encoder and Decoder follow CompVis `ldm.modules.diffusionmodules.model` (the taming-transformers
layout): conv_in, per level `down.{i}.block.{j}` / `down.{i}.attn.{j}` / `down.{i}.downsample.conv`,
`mid.{block_1, attn_1, block_2}`, norm_out, conv_out; the decoder's levels are `up.{i}` with
`upsample.conv`. Flax module names are those keys with "." before an index replaced by "_"
(`encoder/down_0/block_1/norm1`); `mid/block_1` keeps its own name. GroupNorm eps 1e-6 throughout,
SiLU ("swish"), downsampling pads (0, 1, 0, 1) before a stride-2 VALID conv, upsampling is nearest x2
then a 3x3 conv.

These stay in full precision in the MSFP pipeline; only the decoder is on the sampling path. Decoding
follows `LatentDiffusion.decode_first_stage`: the caller divides the latents by `scale_factor` first;
for VQ models the latents are snapped to the nearest codebook entry unless `force_not_quantize`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msfp_jax.models.attention import MatMul
from msfp_jax.models.json_config import JSONConfig
from msfp_jax.models.layers import group_norm

NORM_EPS = 1e-6
NUM_GROUPS = 32
ARCHITECTURES = ("vq_f4", "kl_f8")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoencoderConfig(JSONConfig):
  """CompVis `first_stage_config.params` (ddconfig fields plus embed_dim / n_embed).

  Attributes:
    ch, ch_mult, num_res_blocks, attn_resolutions, resolution: the encoder/decoder shape (ddconfig).
    in_channels, out_ch: image channels.
    z_channels: channels at the encoder output / decoder input.
    double_z: the encoder outputs mean and log-variance (KL models).
    embed_dim: latent channels after quant_conv (the diffusion model's latent channels).
    n_embed: codebook size of VQ models (None for KL models).
  """
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = ()
  resolution: int = 256
  in_channels: int = 3
  out_ch: int = 3
  z_channels: int = 3
  double_z: bool = False
  embed_dim: int = 3
  n_embed: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
    for mult in self.ch_mult:
      if (self.ch * mult) % NUM_GROUPS:
        raise ValueError(f"every level width ch * mult must be a multiple of {NUM_GROUPS}; got "
                         f"{self.ch} * {mult}.")

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


def _conv(features, kernel, name, strides=1, padding=None):
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding, name=name)


class ResnetBlock(nn.Module):
  """norm1-swish-conv1, norm2-swish-conv2, + skip (1x1 `nin_shortcut` when the width changes)."""
  out_channels: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.out_channels, 3, "conv1")(nn.silu(group_norm(NUM_GROUPS, NORM_EPS, "norm1")(x)))
    h = _conv(self.out_channels, 3, "conv2")(nn.silu(group_norm(NUM_GROUPS, NORM_EPS, "norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention with 1x1-conv q, k, v, proj_out (as in the checkpoints)."""

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = group_norm(NUM_GROUPS, NORM_EPS, "norm")(x)
    q, k, v = (_conv(channels, 1, name)(h).reshape(batch, height * width, channels) for name in "qkv")
    w = MatMul("bic,bjc->bij", name="qk_matmul")(q, k) * (channels ** -0.5)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = MatMul("bij,bjc->bic", name="av_matmul")(w, v).reshape(batch, height, width, channels)
    return x + _conv(channels, 1, "proj_out")(h)


class _Downsample(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, "conv", strides=2, padding="VALID")(x)


class _Upsample(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, "conv")(x)


class _Level(nn.Module):
  """One resolution level: block_{j} (+ attn_{j}) then optional down/upsample."""
  channels: int
  num_blocks: int
  use_attn: bool
  resample: str | None  # "down", "up" or None

  @nn.compact
  def __call__(self, h):
    for j in range(self.num_blocks):
      h = ResnetBlock(self.channels, name=f"block_{j}")(h)
      if self.use_attn:
        h = AttnBlock(name=f"attn_{j}")(h)
    if self.resample == "down":
      h = _Downsample(name="downsample")(h)
    elif self.resample == "up":
      h = _Upsample(name="upsample")(h)
    return h


class _Mid(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, h):
    h = ResnetBlock(self.channels, name="block_1")(h)
    h = AttnBlock(name="attn_1")(h)
    return ResnetBlock(self.channels, name="block_2")(h)


class Encoder(nn.Module):
  config: AutoencoderConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = _conv(cfg.ch, 3, "conv_in")(x)
    res = cfg.resolution
    last = len(cfg.ch_mult) - 1
    for i, mult in enumerate(cfg.ch_mult):
      h = _Level(cfg.ch * mult, cfg.num_res_blocks, res in cfg.attn_resolutions,
                 "down" if i != last else None, name=f"down_{i}")(h)
      if i != last:
        res //= 2
    h = _Mid(h.shape[-1], name="mid")(h)
    h = nn.silu(group_norm(NUM_GROUPS, NORM_EPS, "norm_out")(h))
    return _conv(2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, "conv_out")(h)


class Decoder(nn.Module):
  config: AutoencoderConfig

  @nn.compact
  def __call__(self, z):
    cfg = self.config
    last = len(cfg.ch_mult) - 1
    h = _conv(cfg.ch * cfg.ch_mult[last], 3, "conv_in")(z)
    h = _Mid(h.shape[-1], name="mid")(h)
    res = cfg.resolution // 2 ** last
    for i in reversed(range(len(cfg.ch_mult))):
      h = _Level(cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, res in cfg.attn_resolutions,
                 "up" if i != 0 else None, name=f"up_{i}")(h)
      if i != 0:
        res *= 2
    h = nn.silu(group_norm(NUM_GROUPS, NORM_EPS, "norm_out")(h))
    return _conv(cfg.out_ch, 3, "conv_out")(h)


class VectorQuantizer(nn.Module):
  """Nearest-codebook-entry lookup (taming VectorQuantizer2 at inference): `embedding` [n_embed, dim]."""
  n_embed: int
  embed_dim: int

  @nn.compact
  def __call__(self, z):
    codebook = self.param("embedding", nn.initializers.uniform(scale=2.0 / self.n_embed),
                          (self.n_embed, self.embed_dim))
    return jnp.take(codebook, self.indices(z, codebook), axis=0)

  @staticmethod
  def indices(z, codebook):
    """argmin_k |z - e_k|^2 per position, written as taming does (|z|^2 + |e|^2 - 2 z.e)."""
    flat = z.reshape(-1, z.shape[-1])
    d = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(codebook ** 2, axis=1)[None, :]
         - 2 * jnp.matmul(flat, codebook.T, precision=jax.lax.Precision.HIGHEST))
    return jnp.argmin(d, axis=1).reshape(z.shape[:-1])


class _FirstStage(nn.Module):
  """What both first stages share: the config, the example input, and encoder -> quant_conv (1x1) to the
  latents, post_quant_conv (1x1) -> decoder back."""
  config: AutoencoderConfig

  def example_inputs(self, batch_size: int = 1) -> tuple:
    f = self.config.downsampling_factor
    return (jnp.zeros((batch_size, f, f, self.config.in_channels), jnp.float32),)

  def _setup_codec(self, latent_channels: int) -> None:
    cfg = self.config
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quant_conv = nn.Conv(latent_channels, (1, 1))
    self.post_quant_conv = nn.Conv(cfg.z_channels, (1, 1))


class VQAutoencoder(_FirstStage):
  """VQ-f4 (CompVis VQModelInterface): encoder, quant_conv, quantize.embedding, post_quant_conv, decoder.

  `apply(v, x)` reconstructs images; `apply(v, x, method="encode")` gives the pre-quantization latents
  (what the diffusion model is trained on); `apply(v, z, method="decode")` snaps z to the codebook and
  decodes, `apply(v, z, True, method="decode")` decodes without the lookup.
  """

  def setup(self):
    cfg = self.config
    if cfg.n_embed is None:
      raise ValueError("a VQ autoencoder needs n_embed (the codebook size).")
    self._setup_codec(latent_channels=cfg.embed_dim)
    self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)

  def encode(self, x):
    return self.quant_conv(self.encoder(x))

  def decode(self, z, force_not_quantize: bool = False):
    if not force_not_quantize:
      z = self.quantize(z)
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x):
    return self.decode(self.encode(x))


class KLAutoencoder(_FirstStage):
  """KL-f8 (CompVis AutoencoderKL): encoder (mean, log-variance), quant_conv, post_quant_conv, decoder.

  `apply(v, x, method="encode")` -> (mean, logvar) with logvar clamped to [-30, 20] as
  DiagonalGaussianDistribution does; `apply(v, z, method="decode")` decodes; `apply(v, x)`
  reconstructs from the mean.
  """

  def setup(self):
    cfg = self.config
    if not cfg.double_z:
      raise ValueError("a KL autoencoder needs double_z=True (the encoder gives mean and log-variance).")
    self._setup_codec(latent_channels=2 * cfg.embed_dim)  # mean and log-variance

  def encode(self, x):
    moments = self.quant_conv(self.encoder(x))
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z, force_not_quantize: bool = False):
    del force_not_quantize  # VQ only; accepted so that both first stages decode the same way
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x):
    return self.decode(self.encode(x)[0])


def build(architecture: str, config: dict[str, Any] | AutoencoderConfig):
  """The first-stage module for a registry name ("vq_f4" or "kl_f8") and its config."""
  if not isinstance(config, AutoencoderConfig):
    config = AutoencoderConfig.from_dict(config)
  if architecture == "vq_f4":
    return VQAutoencoder(config)
  if architecture == "kl_f8":
    return KLAutoencoder(config)
  raise ValueError(f"unknown first-stage architecture {architecture!r}; choose one of {ARCHITECTURES}.")


def init_shapes(architecture: str, config: AutoencoderConfig):
  """Parameter ShapeDtypeStructs (no allocation): `{"params": ...}`."""
  model = build(architecture, config)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *model.example_inputs()))
