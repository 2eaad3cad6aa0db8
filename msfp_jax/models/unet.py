"""The DDPM UNet of Ho et al. (pytorch_diffusion / DDIM layout) as a Flax linen module.

Call convention shared by every tool: `model.apply(variables, x, t)` with x NHWC float32 and t integer
timesteps [batch] returns the predicted noise (NHWC); class-conditional models take labels as the third
argument, `model.apply(variables, x, t, y)`. Dropout is active only with `train=True` and then draws from
the 'dropout' rng.

Module names mirror the pytorch_diffusion checkpoint (`down.0.block.1.conv1` -> `down_0_block_1/conv1`), so
converters are a renaming and quantization rules can address layers by the names used in the papers.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from msfp_jax.models.layers import AttnBlock, Concat, Downsample, ResBlock, Upsample, group_norm, timestep_embedding


class InvalidModelConfigError(ValueError):
  """A model configuration describes a network that cannot be built."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DDPMUNetConfig:
  """Architecture of a DDPM UNet. The defaults are Ho et al.'s CIFAR-10 model (35,746,307 parameters)."""

  resolution: int = 32  # input height = width; attention placement is defined relative to it
  in_channels: int = 3
  out_channels: int = 3
  ch: int = 128  # channels after conv_in; level i has ch * ch_mult[i] channels
  ch_mult: tuple[int, ...] = (1, 2, 2, 2)  # one entry per resolution level
  num_res_blocks: int = 2  # ResBlocks per level on the way down (the way up has one more)
  attn_resolutions: tuple[int, ...] = (16,)  # spatial sizes (pixels) at which self-attention follows each ResBlock
  dropout: float = 0.1
  num_classes: int | None = None  # None: unconditional; else a label embedding is added to the time embedding
  resamp_with_conv: bool = True  # False: average-pool down / no conv after nearest upsampling
  num_groups: int = 32  # GroupNorm groups
  norm_eps: float = 1e-6  # GroupNorm epsilon
  # Timestep embedding variants (see layers.timestep_embedding); the defaults are DDPM's.
  flip_sin_to_cos: bool = False
  freq_shift: float = 1.0
  downsample_padding: int = 0  # 0: DDPM's asymmetric (0,1,0,1) pad; 1: diffusers' symmetric padding 1
  mid_attention: bool = True  # the middle block's attention (diffusers' add_attention)
  # Channels per attention head, the same at every attention layer (heads = width // attn_head_channels:
  # diffusers' UNet2DModel attention_head_dim); None: one head over all channels, as in DDPM.
  attn_head_channels: int | None = None

  def __post_init__(self):
    # JSON gives lists; the config is hashable and comparable only with tuples.
    for name in ("ch_mult", "attn_resolutions"):
      value = getattr(self, name)
      if isinstance(value, (list, tuple)):
        object.__setattr__(self, name, tuple(value))
    problems = self.problems()
    if problems:
      raise InvalidModelConfigError("Invalid DDPMUNetConfig: " + "; ".join(problems) + ".")

  @property
  def level_resolutions(self) -> tuple[int, ...]:
    """Spatial size of each level (the resolutions at which attention can be placed)."""
    return tuple(self.resolution // 2 ** i for i in range(len(self.ch_mult)))

  @property
  def temb_channels(self) -> int:
    return 4 * self.ch

  @property
  def attention_widths(self) -> tuple[int, ...]:
    """Channel counts of the attention layers (each level with attention, then the middle block's)."""
    widths = [self.ch * m for m, r in zip(self.ch_mult, self.level_resolutions) if r in self.attn_resolutions]
    return tuple(widths + ([self.ch * self.ch_mult[-1]] if self.mid_attention else []))

  def problems(self) -> list[str]:
    """Everything that makes this configuration impossible to build, as readable sentences."""
    p = []
    ints = {"resolution": self.resolution, "in_channels": self.in_channels, "out_channels": self.out_channels,
            "ch": self.ch, "num_res_blocks": self.num_res_blocks, "num_groups": self.num_groups}
    for name, value in ints.items():
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        p.append(f"{name} must be a positive integer, got {value!r}")
    if p:
      return p
    if not self.ch_mult:
      return ["ch_mult is empty: give one channel multiplier per resolution level, e.g. (1, 2, 2, 2)"]
    if any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in self.ch_mult):
      return [f"ch_mult entries must be positive integers, got {self.ch_mult}"]
    downsamplings = len(self.ch_mult) - 1
    if self.resolution % (2 ** downsamplings):
      p.append(f"resolution {self.resolution} is not divisible by 2**{downsamplings} (one halving per level "
               f"after the first for ch_mult {self.ch_mult})")
    bad_attn = [r for r in self.attn_resolutions if r not in self.level_resolutions]
    if bad_attn:
      p.append(f"attn_resolutions {bad_attn} never occur: with resolution {self.resolution} and "
               f"{len(self.ch_mult)} levels the feature maps are {list(self.level_resolutions)} pixels wide")
    widths = sorted({self.ch} | {self.ch * m for m in self.ch_mult})
    bad_widths = [w for w in widths if w % self.num_groups]
    if bad_widths:
      p.append(f"channel counts {bad_widths} (ch={self.ch} times ch_mult) are not divisible by the "
               f"{self.num_groups} GroupNorm groups")
    if not 0.0 <= self.dropout < 1.0:
      p.append(f"dropout must be in [0, 1), got {self.dropout}")
    if self.num_classes is not None and (not isinstance(self.num_classes, int) or self.num_classes < 1):
      p.append(f"num_classes must be None (unconditional) or a positive integer, got {self.num_classes!r}")
    if self.downsample_padding not in (0, 1):
      p.append(f"downsample_padding must be 0 (DDPM) or 1 (diffusers' symmetric variant), "
               f"got {self.downsample_padding}")
    if self.ch // 2 - self.freq_shift == 0:
      p.append(f"freq_shift {self.freq_shift} divides by zero for a {self.ch}-wide timestep embedding")
    if self.norm_eps <= 0:
      p.append(f"norm_eps must be positive, got {self.norm_eps}")
    head = self.attn_head_channels
    if head is not None:
      if not isinstance(head, int) or isinstance(head, bool) or head < 1:
        p.append(f"attn_head_channels must be None (single-head) or a positive integer, got {head!r}")
      else:
        bad_heads = sorted({w for w in self.attention_widths if w % head})
        if bad_heads:
          p.append(f"attention widths {bad_heads} cannot be split into heads of attn_head_channels={head} "
                   "channels")
    return p

  def to_dict(self) -> dict:
    """A JSON-ready dict; `DDPMUNetConfig(**d)` rebuilds the config."""
    return dataclasses.asdict(self)


# Public checkpoints' configurations (see docs/checkpoints.md).
PRESETS: dict[str, DDPMUNetConfig] = {
    # Ho et al. CIFAR-10 (TF, pytorch_diffusion, diffusers google/ddpm-cifar10-32): 35,746,307 parameters.
    "cifar10": DDPMUNetConfig(resolution=32, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                              attn_resolutions=(16,), dropout=0.1),
    # DDIM CelebA 64x64 (DDIM authors' release): 78,700,803 parameters.
    "celeba": DDPMUNetConfig(resolution=64, ch=128, ch_mult=(1, 2, 2, 2, 4), num_res_blocks=2,
                             attn_resolutions=(16,), dropout=0.1),
}


def preset(name: str) -> DDPMUNetConfig:
  """The DDPMUNetConfig of a public checkpoint: 'cifar10' or 'celeba'."""
  if name not in PRESETS:
    raise InvalidModelConfigError(f"Unknown DDPM UNet preset {name!r}; known presets: {sorted(PRESETS)}.")
  return PRESETS[name]


class DDPMUNet(nn.Module):
  """The DDPM UNet (Ho et al. 2020); see the module docstring for the call convention."""

  config: DDPMUNetConfig

  def example_inputs(self, batch_size: int = 1) -> tuple[jax.Array, ...]:
    """Zero inputs of the right shapes/dtypes, e.g. for `jax.eval_shape(model.init, rng, *inputs)`."""
    c = self.config
    x = jnp.zeros((batch_size, c.resolution, c.resolution, c.in_channels), jnp.float32)
    t = jnp.zeros((batch_size,), jnp.int32)
    return (x, t) if c.num_classes is None else (x, t, jnp.zeros((batch_size,), jnp.int32))

  def _check_inputs(self, x, t, y):
    c = self.config
    if x.ndim != 4 or x.shape[1:] != (c.resolution, c.resolution, c.in_channels):
      raise ValueError(f"DDPMUNet expects x of shape [batch, {c.resolution}, {c.resolution}, {c.in_channels}] "
                       f"(NHWC), got {tuple(x.shape)}.")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
      raise ValueError(f"DDPMUNet expects one timestep per example, t of shape [{x.shape[0]}], "
                       f"got {tuple(t.shape)}.")
    if c.num_classes is None and y is not None:
      raise ValueError("This DDPMUNet is unconditional (num_classes=None) but labels y were given.")
    if c.num_classes is not None and (y is None or y.shape != (x.shape[0],)):
      raise ValueError(f"This DDPMUNet is class-conditional ({c.num_classes} classes): pass integer labels y "
                       f"of shape [{x.shape[0]}] as the third argument, got "
                       f"{None if y is None else tuple(y.shape)}.")

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    c = self.config
    x = jnp.asarray(x)
    t = jnp.asarray(t)
    if t.ndim == 0:
      t = jnp.broadcast_to(t, (x.shape[0],))
    y = None if y is None else jnp.asarray(y)
    self._check_inputs(x, t, y)
    norm = dict(num_groups=c.num_groups, eps=c.norm_eps)
    block = dict(dropout=c.dropout, **norm)
    attn = dict(head_channels=c.attn_head_channels, **norm)

    temb = timestep_embedding(t, c.ch, flip_sin_to_cos=c.flip_sin_to_cos, freq_shift=c.freq_shift)
    temb = nn.Dense(c.temb_channels, name="temb_dense_0")(temb)
    temb = nn.Dense(c.temb_channels, name="temb_dense_1")(nn.silu(temb))
    if c.num_classes is not None:
      temb = temb + nn.Embed(c.num_classes, c.temb_channels, name="label_emb")(y)

    # Down: every ResBlock (+attention) output and every downsample output is kept for the skips.
    hs = [nn.Conv(c.ch, (3, 3), padding=((1, 1), (1, 1)), name="conv_in")(x)]
    levels = len(c.ch_mult)
    res = c.resolution
    for i in range(levels):
      for j in range(c.num_res_blocks):
        h = ResBlock(c.ch * c.ch_mult[i], name=f"down_{i}_block_{j}", **block)(hs[-1], temb, train=train)
        if res in c.attn_resolutions:
          h = AttnBlock(name=f"down_{i}_attn_{j}", **attn)(h)
        hs.append(h)
      if i != levels - 1:
        hs.append(Downsample(c.resamp_with_conv, c.downsample_padding, name=f"down_{i}_downsample")(hs[-1]))
        res //= 2

    h = hs[-1]
    h = ResBlock(h.shape[-1], name="mid_block_1", **block)(h, temb, train=train)
    if c.mid_attention:
      h = AttnBlock(name="mid_attn_1", **attn)(h)
    h = ResBlock(h.shape[-1], name="mid_block_2", **block)(h, temb, train=train)

    # Up: num_res_blocks + 1 ResBlocks per level, each fed the running h concatenated with one skip.
    for i in reversed(range(levels)):
      for j in range(c.num_res_blocks + 1):
        h = Concat(name=f"up_{i}_concat_{j}")(h, hs.pop())
        h = ResBlock(c.ch * c.ch_mult[i], name=f"up_{i}_block_{j}", **block)(h, temb, train=train)
        if res in c.attn_resolutions:
          h = AttnBlock(name=f"up_{i}_attn_{j}", **attn)(h)
      if i != 0:
        h = Upsample(c.resamp_with_conv, name=f"up_{i}_upsample")(h)
        res *= 2
    assert not hs, "every skip connection is consumed"

    h = nn.silu(group_norm(c.num_groups, c.norm_eps, "norm_out")(h))
    return nn.Conv(c.out_channels, (3, 3), padding=((1, 1), (1, 1)), name="conv_out")(h)
