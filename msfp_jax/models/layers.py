"""Building blocks shared by the pixel-space and latent UNets.

Every linear map is an `nn.Conv` or `nn.Dense` and the two attention products are `MatMul` modules, so a
quantization interceptor (which only sees module calls) can observe and replace all of them; the UNets'
skip concatenations are `Concat` modules, so it can also see where a tensor joins two sources. Nothing here
knows about quantization.

Layouts are NHWC. Module names follow the pytorch_diffusion checkpoint layout (norm1, conv1, temb_proj, ...)
so that converters and path-regex quantization rules can name layers the way the papers do.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from msfp_jax.models.attention import MatMul


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal timestep embedding, [batch] -> [batch, dim] float32.

  Frequencies are exp(-log(max_period) * k / (half - freq_shift)), k = 0..half-1. The defaults
  (sin first, freq_shift=1) are the DDPM embedding of Ho et al.; diffusers exposes both knobs as
  `flip_sin_to_cos` and `freq_shift` (openaimodel / LDM: flip_sin_to_cos=True, freq_shift=0).
  An odd `dim` is zero-padded at the end, as in DDPM.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class Concat(nn.Module):
  """`concatenate([a, b], axis=-1)`: a UNet up-block joining the running features and a skip.

  A module only so that method interceptors see the join (the two sources have very different ranges); it
  has no parameters, so checkpoints and converters are unaffected.
  """

  @nn.compact
  def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.concatenate([a, b], axis=-1)


def group_norm(num_groups: int, eps: float, name: str) -> nn.GroupNorm:
  """GroupNorm with torch's conventions (affine scale/bias, statistics over H, W and the group)."""
  # use_fast_variance=False: E[(x-mean)^2] rather than E[x^2]-mean^2, which loses digits in float32 when
  # activations have a large mean; matching PyTorch to 1e-4 relative needs the careful form.
  return nn.GroupNorm(num_groups=num_groups, epsilon=eps, use_fast_variance=False, name=name)


class ResBlock(nn.Module):
  """DDPM residual block: norm-SiLU-conv, + projected time embedding, norm-SiLU-dropout-conv, + skip.

  The skip is a 1x1 conv `nin_shortcut` when the channel count changes (DDPM's default), or a 3x3 conv
  `conv_shortcut` when `conv_shortcut=True`.
  """

  out_channels: int
  num_groups: int = 32
  eps: float = 1e-6
  dropout: float = 0.0
  conv_shortcut: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, *, train: bool = False) -> jax.Array:
    h = nn.silu(group_norm(self.num_groups, self.eps, "norm1")(x))
    h = nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(h)
    h = h + nn.Dense(self.out_channels, name="temb_proj")(nn.silu(temb))[:, None, None, :]
    h = nn.silu(group_norm(self.num_groups, self.eps, "norm2")(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(h)
    if x.shape[-1] != self.out_channels:
      if self.conv_shortcut:
        x = nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_shortcut")(x)
      else:
        x = nn.Conv(self.out_channels, (1, 1), name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Self-attention over the H*W positions with a residual connection (DDPM AttnBlock; multi-head optional).

  q, k, v and proj_out are Dense layers over [B, HW, C] (the checkpoints' 1x1 convs / Linears convert to
  them); the score and value products are the `MatMul` modules `qk_matmul` and `av_matmul`.

  `head_channels=None` (DDPM) is one head over all C channels. Otherwise C // head_channels heads of
  `head_channels` channels each, head h taking channels [h * head_channels, (h + 1) * head_channels) of q, k
  and v, scores scaled by head_channels**-0.5 (diffusers' UNet2DModel `attention_head_dim`). The matmuls then
  carry a head axis: scores [B, heads, HW, HW].
  """

  num_groups: int = 32
  eps: float = 1e-6
  head_channels: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, channels = x.shape
    h = group_norm(self.num_groups, self.eps, "norm")(x).reshape(batch, height * width, channels)
    q = nn.Dense(channels, name="q")(h)
    k = nn.Dense(channels, name="k")(h)
    v = nn.Dense(channels, name="v")(h)
    if self.head_channels is None or self.head_channels == channels:
      scores = MatMul("bqc,bkc->bqk", name="qk_matmul")(q, k) * (channels ** -0.5)
      weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
      h = MatMul("bqk,bkc->bqc", name="av_matmul")(weights, v)
    else:
      if channels % self.head_channels:
        raise ValueError(f"{channels} channels cannot be split into heads of {self.head_channels} channels.")
      split = lambda a: a.reshape(batch, height * width, channels // self.head_channels, self.head_channels)
      scores = MatMul("bqhd,bkhd->bhqk", name="qk_matmul")(split(q), split(k)) * (self.head_channels ** -0.5)
      weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
      h = MatMul("bhqk,bkhd->bqhd", name="av_matmul")(weights, split(v)).reshape(batch, height * width, channels)
    h = nn.Dense(channels, name="proj_out")(h)
    return x + h.reshape(batch, height, width, channels)


class Downsample(nn.Module):
  """Halves H and W: stride-2 3x3 conv (DDPM: pad (0,1,0,1) then VALID) or 2x2 average pooling.

  `padding=1` is diffusers' symmetric variant (its UNet2DModel default, not DDPM's).
  """

  with_conv: bool = True
  padding: int = 0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.with_conv:
      return nn.avg_pool(x, (2, 2), strides=(2, 2))
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      pad = "VALID"
    else:
      pad = ((self.padding, self.padding), (self.padding, self.padding))
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding=pad, name="conv")(x)


class Upsample(nn.Module):
  """Doubles H and W: nearest-neighbour x2, then (optionally) a 3x3 conv."""

  with_conv: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if self.with_conv:
      x = nn.Conv(x.shape[-1], (3, 3), padding=((1, 1), (1, 1)), name="conv")(x)
    return x
