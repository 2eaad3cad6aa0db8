"""The latent-diffusion UNet (CompVis `ldm.modules.diffusionmodules.openaimodel.UNetModel`) in Flax.

Covers what the three public LDM checkpoints use: ResBlocks with and without scale-shift norm and
with ResBlock up/down sampling, the legacy-QKV `AttentionBlock` (num_heads or num_head_channels),
the `SpatialTransformer` (self- and cross-attention, GEGLU feed-forward), class conditioning through
an embedding table looked up inside the model and fed as a length-1 cross-attention context (cin256:
[1001, 512], class 1000 is the "no class" of classifier-free guidance), and openaimodel's own
`label_emb` (added to the time embedding) for completeness.

Layout is NHWC; latents need not be square. Module names mirror the CompVis state-dict keys with the
dots between a name and its indices replaced by underscores (`input_blocks.4.1.proj_in` ->
`input_blocks_4_1/proj_in`, `time_embed.0` -> `time_embed_0`, `out.2` -> `out_2`), so that
quantization rules select layers by the names the papers use. Every linear map is an `nn.Conv` or
`nn.Dense`, the attention products are `MatMul` modules (`qk_matmul`, `av_matmul`); nothing here knows
about quantization.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax.models import autoencoder
from msfp_jax.models.attention import MatMul
from msfp_jax.models.json_config import JSONConfig
from msfp_jax.models.layers import Concat, group_norm, timestep_embedding
from msfp_jax.models.registry import build_model, load_extra_tree, read_model_config
from msfp_jax.models.tree_check import raise_on_tree_mismatch

# GroupNorm epsilons of openaimodel: `normalization()` (ResBlocks, AttentionBlock, out) uses torch's
# default 1e-5; the SpatialTransformer's `Normalize()` uses 1e-6.
RESBLOCK_NORM_EPS = 1e-5
TRANSFORMER_NORM_EPS = 1e-6
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default (flax's default is 1e-6)
NUM_GROUPS = 32


def _as_int_tuple(value, name: str) -> tuple[int, ...]:
  if isinstance(value, (int, np.integer)):
    value = (value,)
  try:
    out = tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a sequence of integers, got {value!r}.") from None
  return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class LDMUNetConfig(JSONConfig):
  """Architecture of an openaimodel UNet; field names and meanings follow the CompVis YAML
  (`model.params.unet_config.params`).

  Attributes:
    in_channels, out_channels: latent channels (3 for VQ-f4, 4 for KL-f8).
    model_channels: base width (`ch`).
    channel_mult: width multiplier per resolution level.
    num_res_blocks: ResBlocks per level on the way down (one more on the way up).
    attention_resolutions: downsampling factors (1, 2, 4, ...) at which attention layers sit.
    num_heads: attention heads, or -1 when num_head_channels sets them.
    num_head_channels: channels per head (heads = channels // num_head_channels), or -1.
    num_heads_upsample: heads of the AttentionBlocks on the way up; -1: num_heads.
    use_scale_shift_norm: the time embedding modulates the second GroupNorm (scale, shift) instead of
      being added.
    resblock_updown: down/upsample with ResBlocks (avg-pool / nearest inside) instead of convs.
    use_spatial_transformer: SpatialTransformer (with cross-attention) instead of AttentionBlock.
    transformer_depth: BasicTransformerBlocks per SpatialTransformer.
    context_dim: width of the cross-attention context (the class embedding width for cin256).
    context_classes: rows of the class-embedding table looked up as the cross-attention context
      (CompVis `cond_stage_model.embedding`, ClassEmbedder n_classes; cin256: 1001). None: no table.
    num_classes: openaimodel's own `label_emb` (added to the time embedding). None: none.
    conv_resample: convolutional down/upsampling (otherwise avg-pool / nearest only).
    image_size: the latent resolution the model was trained at (YAML `image_size`; 64 for the f4 models,
      32 for LDM-8). Only sets the shape of `example_inputs` (what samplers draw); any size that is a
      multiple of 2^(levels-1) runs.
  """
  in_channels: int = 3
  out_channels: int = 3
  model_channels: int
  channel_mult: tuple[int, ...]
  num_res_blocks: int
  attention_resolutions: tuple[int, ...]
  num_heads: int = -1
  num_head_channels: int = -1
  num_heads_upsample: int = -1
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  use_spatial_transformer: bool = False
  transformer_depth: int = 1
  context_dim: int | None = None
  context_classes: int | None = None
  num_classes: int | None = None
  conv_resample: bool = True
  image_size: int | None = None

  def __post_init__(self):
    object.__setattr__(self, "channel_mult", _as_int_tuple(self.channel_mult, "channel_mult"))
    object.__setattr__(self, "attention_resolutions",
                       _as_int_tuple(self.attention_resolutions, "attention_resolutions"))
    if self.num_heads == -1 and self.num_head_channels == -1:
      raise ValueError("set num_heads or num_head_channels (both are -1).")
    if self.model_channels <= 0 or self.num_res_blocks <= 0 or not self.channel_mult:
      raise ValueError("model_channels, num_res_blocks and channel_mult must be positive / non-empty.")
    for mult in self.channel_mult:
      if (self.model_channels * mult) % NUM_GROUPS:
        raise ValueError(f"every level width model_channels * mult must be a multiple of {NUM_GROUPS} "
                         f"(GroupNorm groups); got {self.model_channels} * {mult}.")
    if self.use_spatial_transformer and self.context_dim is None:
      raise ValueError("use_spatial_transformer needs context_dim (the cross-attention context width).")
    if self.image_size is not None and self.image_size % self.downsampling_factor:
      raise ValueError(f"image_size {self.image_size} must be a multiple of {self.downsampling_factor} "
                       "(2^(levels-1)).")
    if self.context_classes is not None and not self.use_spatial_transformer:
      raise ValueError("context_classes (a class embedding fed as cross-attention context) needs "
                       "use_spatial_transformer=True.")

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.model_channels

  @property
  def class_conditional(self) -> bool:
    return self.context_classes is not None or self.num_classes is not None

  @property
  def downsampling_factor(self) -> int:
    return 2 ** (len(self.channel_mult) - 1)

  def heads(self, channels: int, *, upsample: bool = False) -> tuple[int, int]:
    """(heads, channels per head) of the attention layer at `channels` width, as openaimodel builds it.

    With legacy=True (all public checkpoints) every variant reduces to: heads = channels //
    num_head_channels when num_head_channels is set, else num_heads (num_heads_upsample for the
    AttentionBlocks of the output blocks; SpatialTransformers always use num_heads).
    """
    if self.num_head_channels != -1:
      heads = channels // self.num_head_channels
    elif upsample and not self.use_spatial_transformer and self.num_heads_upsample != -1:
      heads = self.num_heads_upsample
    else:
      heads = self.num_heads
    if heads <= 0 or channels % heads:
      raise ValueError(f"{channels} channels cannot be split into {heads} attention heads.")
    return heads, channels // heads


def _check_labels(y, num_rows: int, what: str) -> None:
  """Range check when the labels are concrete (outside jit); jnp.take would silently clamp."""
  if isinstance(y, jax.core.Tracer):
    return
  y = np.asarray(y)
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"class labels must be integers, got dtype {y.dtype}.")
  if y.size and (y.min() < 0 or y.max() >= num_rows):
    raise ValueError(f"class label out of range: got values in [{y.min()}, {y.max()}], but the "
                     f"{what} has {num_rows} rows (valid labels 0..{num_rows - 1}).")


def _conv3(features: int, name: str, strides: int = 1) -> nn.Conv:
  return nn.Conv(features, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)), name=name)


def _avg_pool2(x):
  # torch avg_pool2d(kernel 2, stride 2): floor on odd sizes, no padding.
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _nearest_up2(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(nn.Module):
  """openaimodel ResBlock: in_layers (norm, SiLU, conv) -> + emb_layers(emb) -> out_layers -> + skip.

  With scale-shift norm `emb_layers_1` gives 2C (scale first): h = norm(h) * (1 + scale) + shift.
  With up/down, the pooling (nearest x2 / avg 2x2, no conv) sits between in_layers' SiLU and conv, and
  is applied to the skip input too.
  """
  out_channels: int
  use_scale_shift_norm: bool = False
  up: bool = False
  down: bool = False

  @nn.compact
  def __call__(self, x, emb):
    h = nn.silu(group_norm(NUM_GROUPS, RESBLOCK_NORM_EPS, "in_layers_0")(x))
    if self.up:
      h, x = _nearest_up2(h), _nearest_up2(x)
    elif self.down:
      h, x = _avg_pool2(h), _avg_pool2(x)
    h = _conv3(self.out_channels, "in_layers_2")(h)
    emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
    emb_out = nn.Dense(emb_width, name="emb_layers_1")(nn.silu(emb))[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out, 2, axis=-1)
      h = group_norm(NUM_GROUPS, RESBLOCK_NORM_EPS, "out_layers_0")(h) * (1 + scale) + shift
    else:
      h = group_norm(NUM_GROUPS, RESBLOCK_NORM_EPS, "out_layers_0")(h + emb_out)
    h = _conv3(self.out_channels, "out_layers_3")(nn.silu(h))  # out_layers.2 is dropout (inference: off)
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), name="skip_connection")(x)
    return x + h


class AttentionBlock(nn.Module):
  """openaimodel AttentionBlock with the legacy QKV order (QKVAttentionLegacy).

  qkv (a Conv1d k=1 in torch, here a Dense over [B, HW, C]) gives 3C channels laid out per head as
  [q | k | v] (heads are split before q, k, v); q and k are each scaled by ch^-1/4.
  """
  num_heads: int

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    heads = self.num_heads
    head_ch = channels // heads
    h = group_norm(NUM_GROUPS, RESBLOCK_NORM_EPS, "norm")(x).reshape(batch, height * width, channels)
    qkv = nn.Dense(3 * channels, name="qkv")(h).reshape(batch, height * width, heads, 3, head_ch)
    scale = 1.0 / math.sqrt(math.sqrt(head_ch))
    q, k, v = qkv[..., 0, :] * scale, qkv[..., 1, :] * scale, qkv[..., 2, :]
    weights = MatMul("bthc,bshc->bhts", name="qk_matmul")(q, k)
    weights = jax.nn.softmax(weights.astype(jnp.float32), axis=-1).astype(v.dtype)
    a = MatMul("bhts,bshc->bthc", name="av_matmul")(weights, v).reshape(batch, height * width, channels)
    h = nn.Dense(channels, name="proj_out")(a)
    return x + h.reshape(batch, height, width, channels)


class CrossAttention(nn.Module):
  """ldm.modules.attention.CrossAttention: q/k/v without bias, softmax(q k^T / sqrt(d)) v, to_out.0."""
  query_dim: int
  heads: int
  dim_head: int

  @nn.compact
  def __call__(self, x, context=None):
    context = x if context is None else context
    inner = self.heads * self.dim_head
    batch, n = x.shape[:2]
    m = context.shape[1]
    q = nn.Dense(inner, use_bias=False, name="to_q")(x).reshape(batch, n, self.heads, self.dim_head)
    k = nn.Dense(inner, use_bias=False, name="to_k")(context).reshape(batch, m, self.heads, self.dim_head)
    v = nn.Dense(inner, use_bias=False, name="to_v")(context).reshape(batch, m, self.heads, self.dim_head)
    sim = MatMul("bnhd,bmhd->bhnm", name="qk_matmul")(q, k) * (self.dim_head ** -0.5)
    attn = jax.nn.softmax(sim.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = MatMul("bhnm,bmhd->bnhd", name="av_matmul")(attn, v).reshape(batch, n, inner)
    return nn.Dense(self.query_dim, name="to_out_0")(out)


class GEGLU(nn.Module):
  """proj -> (x, gate) -> x * GELU(gate), with the exact (erf) GELU as torch's F.gelu."""
  dim_out: int

  @nn.compact
  def __call__(self, x):
    x, gate = jnp.split(nn.Dense(2 * self.dim_out, name="proj")(x), 2, axis=-1)
    return x * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """net.0 (GEGLU to 4*dim), net.1 (dropout, off), net.2 (Dense back to dim)."""
  dim: int
  mult: int = 4

  @nn.compact
  def __call__(self, x):
    h = GEGLU(self.dim * self.mult, name="net_0")(x)
    return nn.Dense(self.dim, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))."""
  dim: int
  heads: int
  dim_head: int

  @nn.compact
  def __call__(self, x, context=None):
    def norm(name):
      return nn.LayerNorm(epsilon=LAYER_NORM_EPS, use_fast_variance=False, name=name)
    x = CrossAttention(self.dim, self.heads, self.dim_head, name="attn1")(norm("norm1")(x)) + x
    x = CrossAttention(self.dim, self.heads, self.dim_head, name="attn2")(norm("norm2")(x), context) + x
    return FeedForward(self.dim, name="ff")(norm("norm3")(x)) + x


class SpatialTransformer(nn.Module):
  """GroupNorm (eps 1e-6) -> proj_in (1x1 conv) -> transformer blocks over HW tokens -> proj_out -> + x."""
  heads: int
  dim_head: int
  depth: int = 1

  @nn.compact
  def __call__(self, x, context=None):
    batch, height, width, channels = x.shape
    inner = self.heads * self.dim_head
    h = group_norm(NUM_GROUPS, TRANSFORMER_NORM_EPS, "norm")(x)
    h = nn.Conv(inner, (1, 1), name="proj_in")(h).reshape(batch, height * width, inner)
    for i in range(self.depth):
      h = BasicTransformerBlock(inner, self.heads, self.dim_head, name=f"transformer_blocks_{i}")(h, context)
    h = nn.Conv(channels, (1, 1), name="proj_out")(h.reshape(batch, height, width, inner))
    return h + x


class Downsample(nn.Module):
  """Stride-2 3x3 conv with padding 1 (`op`), or 2x2 average pooling without conv_resample."""
  use_conv: bool = True

  @nn.compact
  def __call__(self, x):
    if not self.use_conv:
      return _avg_pool2(x)
    return _conv3(x.shape[-1], "op", strides=2)(x)


class Upsample(nn.Module):
  """Nearest x2, then a 3x3 conv (`conv`) with conv_resample."""
  use_conv: bool = True

  @nn.compact
  def __call__(self, x):
    x = _nearest_up2(x)
    return _conv3(x.shape[-1], "conv")(x) if self.use_conv else x


class LDMUNet(nn.Module):
  """The openaimodel UNet: `apply(variables, x, t)` or `apply(variables, x, t, y)` -> eps (NHWC).

  x: [B, H, W, in_channels] latents (H, W divisible by 2^(levels-1)); t: int [B]; y: int [B] class
  labels for class-conditional configurations (rows of the context table, the null class included).
  `context` may be passed instead of y to give the cross-attention context [B, L, context_dim] directly.
  """
  config: LDMUNetConfig

  def _attention(self, channels: int, name: str, upsample: bool = False):
    cfg = self.config
    heads, dim_head = cfg.heads(channels, upsample=upsample)
    if cfg.use_spatial_transformer:
      return SpatialTransformer(heads, dim_head, cfg.transformer_depth, name=name)
    return AttentionBlock(heads, name=name)

  def _apply_attention(self, layer, h, context):
    if isinstance(layer, SpatialTransformer):
      return layer(h, context)
    return layer(h)

  def example_inputs(self, batch_size: int = 1) -> tuple:
    """Inputs (x, t[, y]) of the trained latent size (or the smallest valid one); x is what samplers draw."""
    cfg = self.config
    f = cfg.image_size or cfg.downsampling_factor
    inputs = (jnp.zeros((batch_size, f, f, cfg.in_channels), jnp.float32), jnp.zeros((batch_size,), jnp.int32))
    return inputs + ((jnp.zeros((batch_size,), jnp.int32),) if cfg.class_conditional else ())

  @nn.compact
  def __call__(self, x, t, y=None, *, context=None):
    cfg = self.config
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"x must be NHWC latents with {cfg.in_channels} channels, got shape {x.shape}.")
    factor = cfg.downsampling_factor
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"latent height and width must be multiples of {factor} "
                       f"(2^(levels-1)); got {x.shape[1]}x{x.shape[2]}.")
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    if cfg.class_conditional and y is None and context is None:
      raise ValueError("this UNet is class-conditional: call apply(variables, x, t, y) with int labels y "
                       "(use the null class for the unconditional branch).")
    if not cfg.class_conditional and y is not None:
      raise ValueError("this UNet is unconditional: call apply(variables, x, t) without labels.")
    if y is not None:
      if cfg.num_classes is not None:
        _check_labels(y, cfg.num_classes, "label_emb table")
      if cfg.context_classes is not None and context is None:
        _check_labels(y, cfg.context_classes, "class-embedding table")

    emb = timestep_embedding(t, cfg.model_channels, flip_sin_to_cos=True, freq_shift=0.0)
    emb = nn.Dense(cfg.time_embed_dim, name="time_embed_0")(emb)
    emb = nn.Dense(cfg.time_embed_dim, name="time_embed_2")(nn.silu(emb))
    if cfg.num_classes is not None and y is not None:
      emb = emb + nn.Embed(cfg.num_classes, cfg.time_embed_dim, name="label_emb")(y)
    if cfg.context_classes is not None and context is None:
      # CompVis ClassEmbedder: embedding(y[:, None]) -> a context of length 1.
      context = ClassEmbedder(cfg.context_classes, cfg.context_dim, name="cond_stage_model")(y)[:, None, :]

    def res(out_ch, name, **kw):
      return ResBlock(out_ch, use_scale_shift_norm=cfg.use_scale_shift_norm, name=name, **kw)

    h = _conv3(cfg.model_channels, "input_blocks_0_0")(x)
    hs = [h]
    ch, ds, n = cfg.model_channels, 1, 1
    for level, mult in enumerate(cfg.channel_mult):
      for _ in range(cfg.num_res_blocks):
        ch = mult * cfg.model_channels
        h = res(ch, f"input_blocks_{n}_0")(h, emb)
        if ds in cfg.attention_resolutions:
          h = self._apply_attention(self._attention(ch, f"input_blocks_{n}_1"), h, context)
        hs.append(h)
        n += 1
      if level != len(cfg.channel_mult) - 1:
        if cfg.resblock_updown:
          h = res(ch, f"input_blocks_{n}_0", down=True)(h, emb)
        else:
          h = Downsample(cfg.conv_resample, name=f"input_blocks_{n}_0")(h)
        hs.append(h)
        n += 1
        ds *= 2

    h = res(ch, "middle_block_0")(h, emb)
    h = self._apply_attention(self._attention(ch, "middle_block_1"), h, context)
    h = res(ch, "middle_block_2")(h, emb)

    n = 0
    for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
      for i in range(cfg.num_res_blocks + 1):
        h = Concat(name=f"output_blocks_{n}_concat")(h, hs.pop())
        ch = cfg.model_channels * mult
        h = res(ch, f"output_blocks_{n}_0")(h, emb)
        m = 1
        if ds in cfg.attention_resolutions:
          h = self._apply_attention(self._attention(ch, f"output_blocks_{n}_1", upsample=True), h, context)
          m = 2
        if level and i == cfg.num_res_blocks:
          if cfg.resblock_updown:
            h = res(ch, f"output_blocks_{n}_{m}", up=True)(h, emb)
          else:
            h = Upsample(cfg.conv_resample, name=f"output_blocks_{n}_{m}")(h)
          ds //= 2
        n += 1

    h = nn.silu(group_norm(NUM_GROUPS, RESBLOCK_NORM_EPS, "out_0")(h))
    return _conv3(cfg.out_channels, "out_2")(h)


class ClassEmbedder(nn.Module):
  """CompVis ClassEmbedder (`cond_stage_model.embedding`): an [n_classes, embed_dim] table."""
  n_classes: int
  embed_dim: int

  @nn.compact
  def __call__(self, y):
    return nn.Embed(self.n_classes, self.embed_dim, name="embedding")(y)


def init_shapes(config: LDMUNetConfig, latent_hw: Sequence[int] | None = None):
  """Parameter ShapeDtypeStructs of a UNet (no allocation, no compilation): `{"params": ...}`."""
  model = LDMUNet(config)
  args = model.example_inputs()
  if latent_hw is not None:
    args = (jnp.zeros((1, *latent_hw, config.in_channels), jnp.float32),) + args[1:]
  return jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *args)


def count_params(tree) -> int:
  """Number of scalars in a (shape) tree."""
  return int(sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree)))


def load_first_stage(dst):
  """Loads the first-stage autoencoder that the CompVis converter wrote beside a LDM UNet.

  Returns (model, {"params": ...}, first_stage dict) where the dict holds "architecture" ("vq_f4" /
  "kl_f8"), "config" and "scale_factor" (latents are divided by it before decoding).
  """
  meta = read_model_config(dst)  # the registry's own reader: same errors as models.load
  first_stage = meta.get("first_stage")
  if not isinstance(first_stage, dict) or "architecture" not in first_stage:
    raise ValueError(f"{dst} holds no first-stage autoencoder (model_config.json has no 'first_stage'); "
                     "convert a CompVis latent-diffusion checkpoint into it.")
  model, cfg = build_model(first_stage["architecture"], first_stage["config"])
  params = load_extra_tree(dst, "first_stage_params")
  raise_on_tree_mismatch(autoencoder.init_shapes(first_stage["architecture"], cfg)["params"], params,
                         what="first-stage parameters")
  return model, {"params": jax.tree.map(jnp.asarray, params)}, first_stage
