"""The Flax LDM UNet against independent references, with random weights made here.

* SpatialTransformer / cross-attention / class-embedding context (the cin256 structure): diffusers'
  UNet2DConditionModel. Its weights are renamed into the CompVis layout by an inverse mapping written
  here, and diffusers' own single-file converter (`convert_ldm_unet_checkpoint`) must map that CompVis
  dict back onto exactly the diffusers state dict: that proves the CompVis dict is what a CompVis
  checkpoint holds. The Flax model converted from it must give diffusers' noise prediction.
* AttentionBlock (legacy QKV order), scale-shift norm and resblock_updown, which diffusers' single-file
  code cannot convert: a float64 PyTorch-functional implementation of openaimodel written here from the
  formulas (it reads the CompVis keys; the same reference also matches diffusers on the transformer case).
* Parameter counts of the three public presets: diffusers models of the same configuration built on
  the meta device, and the published sizes.
Tolerance: relative error <= 1e-4 in float32 (jax highest matmul precision).
"""
from __future__ import annotations

import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msfp_jax.models.convert.common import convert_state_dict
from msfp_jax.models.convert.compvis import config_from_yaml, unet_torch_module
from msfp_jax.models.ldm_presets import PRESETS
from msfp_jax.models.ldm_unet import LDMUNet, LDMUNetConfig, count_params, init_shapes

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from reference_helpers import randomize_, relative_error  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# A cin256-like UNet: SpatialTransformer at ds 1 and 2, 2 heads, class table of 11 rows (10 classes + null).
CIN_LIKE_YAML = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000, "first_stage_key": "image",
    "cond_stage_key": "class_label", "image_size": 8, "channels": 3, "cond_stage_trainable": True,
    "conditioning_key": "crossattn", "monitor": "val/loss", "use_ema": False,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 8, "in_channels": 3, "out_channels": 3, "model_channels": 32, "attention_resolutions": [1, 2],
        "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2, "use_spatial_transformer": True,
        "transformer_depth": 1, "context_dim": 16}},
    "first_stage_config": {"target": "ldm.models.autoencoder.VQModelInterface", "params": {
        "embed_dim": 3, "n_embed": 16, "ddconfig": {
            "double_z": False, "z_channels": 3, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
            "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "lossconfig": {"target": "torch.nn.Identity"}}},
    "cond_stage_config": {"target": "ldm.modules.encoders.modules.ClassEmbedder", "params": {
        "n_classes": 11, "embed_dim": 16, "key": "class_label"}}}}}

# AttentionBlock variants (what diffusers' single-file converter cannot do).
ATTENTION_BLOCK_CONFIGS = {
    # LSUN-Bedroom-like: heads from num_head_channels, attention at two levels, plain ResBlocks.
    "bedroom_like": LDMUNetConfig(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
                                  num_res_blocks=1, attention_resolutions=(2,), num_head_channels=16),
    # LSUN-Church-like: num_heads, scale-shift norm, ResBlock up/down sampling, 4 latent channels, 3 levels.
    "church_like": LDMUNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 1, 2),
                                 num_res_blocks=1, attention_resolutions=(1, 4), num_heads=2,
                                 use_scale_shift_norm=True, resblock_updown=True),
}


# ------------------------------------------------------------------------------------------------
# diffusers <-> CompVis (the inverse of diffusers' single-file mapping, written independently)

_RESNET_TO_COMPVIS = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                      ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"),
                      ("conv_shortcut", "skip_connection"))


def _resnet_name(rest: str) -> str:
  head, _, leaf = rest.rpartition(".")
  for old, new in _RESNET_TO_COMPVIS:
    if head == old:
      return f"{new}.{leaf}"
  raise KeyError(rest)


def diffusers_unet_to_compvis(sd: dict, layers_per_block: int) -> dict:
  """UNet2DConditionModel state dict -> openaimodel keys (without the model.diffusion_model. prefix)."""
  per_level = layers_per_block + 1
  up_has_attention = {int(k.split(".")[1]) for k in sd if k.startswith("up_blocks.") and ".attentions." in k}
  out = {}
  fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
  for key, value in sd.items():
    parts = key.split(".")
    module, leaf = ".".join(parts[:-1]), parts[-1]
    if module in fixed:
      out[f"{fixed[module]}.{leaf}"] = value
    elif parts[0] in ("down_blocks", "up_blocks"):
      b, kind = int(parts[1]), parts[2]
      rest = ".".join(parts[4:])
      down = parts[0] == "down_blocks"
      # Level b's first block; input_blocks.0 is conv_in.
      blocks, first = ("input_blocks", 1 + b * per_level) if down else ("output_blocks", b * per_level)
      if kind == "resnets":
        out[f"{blocks}.{first + int(parts[3])}.0.{_resnet_name(rest)}"] = value
      elif kind == "attentions":
        out[f"{blocks}.{first + int(parts[3])}.1.{rest}"] = value
      elif down:  # downsamplers.0.conv.*
        out[f"{blocks}.{first + layers_per_block}.0.op.{leaf}"] = value
      else:  # upsamplers.0.conv.*
        slot = 2 if b in up_has_attention else 1
        out[f"{blocks}.{first + layers_per_block}.{slot}.conv.{leaf}"] = value
    elif parts[0] == "mid_block":
      rest = ".".join(parts[3:])
      if parts[1] == "resnets":
        out[f"middle_block.{0 if parts[2] == '0' else 2}.{_resnet_name(rest)}"] = value
      else:
        out[f"middle_block.1.{rest}"] = value
    else:
      raise KeyError(f"unmapped diffusers key {key}")
  return out


def diffusers_unet_config(yaml_dict: dict) -> dict:
  """diffusers' own mapping of a CompVis YAML onto UNet2DConditionModel arguments."""
  from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm
  return create_unet_diffusers_config_from_ldm(yaml_dict, {}, image_size=16)


def make_cin_like(seed: int = 0):
  """(diffusers UNet, CompVis UNet state dict incl. model.diffusion_model. prefix, class table [11, 16])."""
  from diffusers import UNet2DConditionModel
  from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
  config = diffusers_unet_config(CIN_LIKE_YAML)
  torch.manual_seed(seed)
  model = UNet2DConditionModel(**config).eval()
  randomize_(model, seed)
  diffusers_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  compvis = {"model.diffusion_model." + k: v for k, v in
             diffusers_unet_to_compvis(diffusers_sd, config["layers_per_block"]).items()}
  # diffusers' converter must give back exactly the diffusers state dict.
  back = convert_ldm_unet_checkpoint(dict(compvis), config)
  assert sorted(back) == sorted(diffusers_sd)
  for key, value in diffusers_sd.items():
    assert torch.equal(back[key], value), key
  table = torch.randn(11, 16, generator=torch.Generator().manual_seed(seed + 7))
  return model, compvis, table


# ------------------------------------------------------------------------------------------------
# float64 functional openaimodel (from the formulas; reads CompVis keys, NCHW)


class LazyWeights:
  """CompVis-keyed weights; a missing key is created random on first use (so one forward pass with a
  generator builds a complete random state dict in the checkpoint layout)."""

  def __init__(self, state_dict=None, seed=None):
    self.sd = dict(state_dict or {})
    self.gen = None if seed is None else torch.Generator().manual_seed(seed)

  def __call__(self, key, shape):
    if key not in self.sd:
      if self.gen is None:
        raise KeyError(key)
      if key.endswith("bias"):
        value = 0.3 * torch.randn(shape, generator=self.gen)
      elif len(shape) == 1:  # norm scale
        value = 1.0 + 0.3 * torch.randn(shape, generator=self.gen)
      else:
        value = torch.randn(shape, generator=self.gen) / math.sqrt(math.prod(shape[1:]))
      self.sd[key] = value.float()
    value = self.sd[key]
    assert tuple(value.shape) == tuple(shape), (key, value.shape, shape)
    return value.double()


def _gn(w, key, x, eps):
  c = x.shape[1]
  return F.group_norm(x, 32, w(key + ".weight", (c,)), w(key + ".bias", (c,)), eps)


def _conv(w, key, x, out_ch, k=3, stride=1):
  return F.conv2d(x, w(key + ".weight", (out_ch, x.shape[1], k, k)), w(key + ".bias", (out_ch,)), stride, k // 2)


def _linear(w, key, x, out_f, bias=True):
  return F.linear(x, w(key + ".weight", (out_f, x.shape[-1])), w(key + ".bias", (out_f,)) if bias else None)


def _ref_resblock(w, key, x, emb, out_ch, cfg, up=False, down=False):
  h = F.silu(_gn(w, key + ".in_layers.0", x, 1e-5))
  if up:
    h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
  elif down:
    h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
  h = _conv(w, key + ".in_layers.2", h, out_ch)
  e = _linear(w, key + ".emb_layers.1", F.silu(emb), 2 * out_ch if cfg.use_scale_shift_norm else out_ch)
  e = e[:, :, None, None]
  if cfg.use_scale_shift_norm:
    scale, shift = e.chunk(2, dim=1)
    h = _gn(w, key + ".out_layers.0", h, 1e-5) * (1 + scale) + shift
  else:
    h = _gn(w, key + ".out_layers.0", h + e, 1e-5)
  h = _conv(w, key + ".out_layers.3", F.silu(h), out_ch)
  skip = x if x.shape[1] == out_ch else _conv(w, key + ".skip_connection", x, out_ch, k=1)
  return skip + h


def _ref_attention_block(w, key, x, heads):
  b, c, height, width = x.shape
  xf = x.reshape(b, c, -1)
  xn = F.group_norm(xf, 32, w(key + ".norm.weight", (c,)), w(key + ".norm.bias", (c,)), 1e-5)
  qkv = F.conv1d(xn, w(key + ".qkv.weight", (3 * c, c, 1)), w(key + ".qkv.bias", (3 * c,)))
  ch = c // heads
  q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)  # legacy order: heads split first
  scale = 1 / math.sqrt(math.sqrt(ch))
  weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
  a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, -1, height * width)
  h = F.conv1d(a, w(key + ".proj_out.weight", (c, c, 1)), w(key + ".proj_out.bias", (c,)))
  return (xf + h).reshape(b, c, height, width)


def _ref_cross_attention(w, key, x, context, heads, dim_head):
  context = x if context is None else context
  inner = heads * dim_head
  q = _linear(w, key + ".to_q", x, inner, bias=False)
  k = _linear(w, key + ".to_k", context, inner, bias=False)
  v = _linear(w, key + ".to_v", context, inner, bias=False)
  split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, dim_head).transpose(1, 2)  # noqa: E731
  attn = torch.softmax(split(q) @ split(k).transpose(-1, -2) * dim_head ** -0.5, dim=-1)
  out = (attn @ split(v)).transpose(1, 2).reshape(x.shape[0], x.shape[1], inner)
  return _linear(w, key + ".to_out.0", out, x.shape[-1])


def _ref_spatial_transformer(w, key, x, context, heads, dim_head, depth):
  b, c, height, width = x.shape
  inner = heads * dim_head
  h = _conv(w, key + ".proj_in", _gn(w, key + ".norm", x, 1e-6), inner, k=1)
  h = h.reshape(b, inner, -1).transpose(1, 2)
  ln = lambda name, t: F.layer_norm(t, (inner,), w(name + ".weight", (inner,)), w(name + ".bias", (inner,)), 1e-5)  # noqa: E731
  for d in range(depth):
    p = f"{key}.transformer_blocks.{d}"
    h = _ref_cross_attention(w, p + ".attn1", ln(p + ".norm1", h), None, heads, dim_head) + h
    h = _ref_cross_attention(w, p + ".attn2", ln(p + ".norm2", h), context, heads, dim_head) + h
    a, gate = _linear(w, p + ".ff.net.0.proj", ln(p + ".norm3", h), 8 * inner).chunk(2, dim=-1)
    h = _linear(w, p + ".ff.net.2", a * F.gelu(gate), inner) + h
  h = h.transpose(1, 2).reshape(b, inner, height, width)
  return _conv(w, key + ".proj_out", h, c, k=1) + x


def reference_unet(w: LazyWeights, cfg: LDMUNetConfig, x, t, context=None):
  """openaimodel.UNetModel.forward in float64 (NCHW in and out), with openaimodel's head bookkeeping."""
  prefix = "model.diffusion_model."
  mc = cfg.model_channels
  half = mc // 2
  freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
  args = t.double()[:, None] * freqs[None]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  emb = _linear(w, prefix + "time_embed.0", emb, 4 * mc)
  emb = _linear(w, prefix + "time_embed.2", F.silu(emb), 4 * mc)

  num_heads = cfg.num_heads
  upsample_heads = cfg.num_heads_upsample if cfg.num_heads_upsample != -1 else cfg.num_heads

  def attention(key, h, ch, output_side):
    nonlocal num_heads
    if cfg.num_head_channels == -1:
      dim_head = ch // num_heads
    else:
      num_heads = ch // cfg.num_head_channels
      dim_head = cfg.num_head_channels
    dim_head = ch // num_heads if cfg.use_spatial_transformer else cfg.num_head_channels  # legacy=True
    if cfg.use_spatial_transformer:
      return _ref_spatial_transformer(w, key, h, context, num_heads, dim_head, cfg.transformer_depth)
    heads = (upsample_heads if output_side else num_heads) if dim_head == -1 else ch // dim_head
    return _ref_attention_block(w, key, h, heads)

  h = _conv(w, prefix + "input_blocks.0.0", x, mc)
  hs, ch, ds, n = [h], mc, 1, 1
  for level, mult in enumerate(cfg.channel_mult):
    for _ in range(cfg.num_res_blocks):
      h = _ref_resblock(w, f"{prefix}input_blocks.{n}.0", h, emb, mult * mc, cfg)
      ch = mult * mc
      if ds in cfg.attention_resolutions:
        h = attention(f"{prefix}input_blocks.{n}.1", h, ch, False)
      hs.append(h)
      n += 1
    if level != len(cfg.channel_mult) - 1:
      if cfg.resblock_updown:
        h = _ref_resblock(w, f"{prefix}input_blocks.{n}.0", h, emb, ch, cfg, down=True)
      else:
        h = _conv(w, f"{prefix}input_blocks.{n}.0.op", h, ch, stride=2)
      hs.append(h)
      n += 1
      ds *= 2
  h = _ref_resblock(w, prefix + "middle_block.0", h, emb, ch, cfg)
  h = attention(prefix + "middle_block.1", h, ch, False)
  h = _ref_resblock(w, prefix + "middle_block.2", h, emb, ch, cfg)
  n = 0
  for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
    for i in range(cfg.num_res_blocks + 1):
      h = torch.cat([h, hs.pop()], dim=1)
      ch = mc * mult
      h = _ref_resblock(w, f"{prefix}output_blocks.{n}.0", h, emb, ch, cfg)
      slot = 1
      if ds in cfg.attention_resolutions:
        h = attention(f"{prefix}output_blocks.{n}.1", h, ch, True)
        slot = 2
      if level and i == cfg.num_res_blocks:
        if cfg.resblock_updown:
          h = _ref_resblock(w, f"{prefix}output_blocks.{n}.{slot}", h, emb, ch, cfg, up=True)
        else:
          h = _conv(w, f"{prefix}output_blocks.{n}.{slot}.conv", F.interpolate(h, scale_factor=2, mode="nearest"), ch)
        ds //= 2
      n += 1
  h = F.silu(_gn(w, prefix + "out.0", h, 1e-5))
  return _conv(w, prefix + "out.2", h, cfg.out_channels)


def random_compvis_unet(cfg: LDMUNetConfig, seed: int) -> dict:
  """A random CompVis state dict for `cfg`, built by one reference forward pass."""
  w = LazyWeights(seed=seed)
  f = 2 ** (len(cfg.channel_mult) - 1)
  with torch.no_grad():
    reference_unet(w, cfg, torch.zeros(1, cfg.in_channels, 2 * f, 2 * f, dtype=torch.float64), torch.zeros(1))
  return w.sd


def flax_params(cfg: LDMUNetConfig, compvis_sd: dict) -> dict:
  numpy_sd = {k: v.numpy() for k, v in compvis_sd.items()}
  return convert_state_dict(numpy_sd, init_shapes(cfg)["params"], unet_torch_module)


# ------------------------------------------------------------------------------------------------
# Tests


def test_spatial_transformer_unet_matches_diffusers_and_reference():
  model, compvis, table = make_cin_like(seed=0)
  cfg = config_from_yaml(CIN_LIKE_YAML).unet
  assert cfg.use_spatial_transformer and cfg.context_classes == 11 and cfg.context_dim == 16
  sd = dict(compvis)
  sd["cond_stage_model.embedding.weight"] = table
  params = flax_params(cfg, sd)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 8, 6, 3)).astype(np.float32)  # non-square latents
  t = np.array([0, 17, 500, 999], np.int32)
  y = np.array([3, 10, 0, 9], np.int32)  # 10 is the null class (unconditional branch)
  apply = jax.jit(LDMUNet(cfg).apply)
  flax_eps = np.asarray(apply({"params": params}, x, t, y))

  x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  context = table[torch.from_numpy(y).long()][:, None, :]
  with torch.no_grad():
    diffusers_eps = model(x_t, torch.from_numpy(t).long(), encoder_hidden_states=context).sample.numpy()
    ref_eps = reference_unet(LazyWeights(sd), cfg, x_t.double(), torch.from_numpy(t), context.double()).numpy()
  diffusers_eps = diffusers_eps.transpose(0, 2, 3, 1)
  ref_eps = ref_eps.transpose(0, 2, 3, 1)
  # The float64 reference is itself checked against diffusers (float32).
  assert relative_error(diffusers_eps, ref_eps) <= 1e-4
  assert relative_error(flax_eps, diffusers_eps) <= 1e-4
  assert relative_error(flax_eps, ref_eps) <= 1e-4
  # The class matters: another label gives another prediction.
  other = np.asarray(apply({"params": params}, x, t, np.array([5, 5, 5, 5], np.int32)))
  assert relative_error(other[:2], flax_eps[:2]) > 1e-2


@pytest.mark.parametrize("name", sorted(ATTENTION_BLOCK_CONFIGS))
def test_attention_block_variants_match_float64_reference(name):
  cfg = ATTENTION_BLOCK_CONFIGS[name]
  sd = random_compvis_unet(cfg, seed=11)
  params = flax_params(cfg, sd)
  rng = np.random.default_rng(1)
  f = cfg.downsampling_factor
  x = rng.standard_normal((2, 2 * f, 3 * f, cfg.in_channels)).astype(np.float32)  # non-square
  t = np.array([5, 730], np.int32)
  flax_eps = np.asarray(jax.jit(LDMUNet(cfg).apply)({"params": params}, x, t))
  with torch.no_grad():
    ref = reference_unet(LazyWeights(sd), cfg, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).double(),
                         torch.from_numpy(t)).numpy().transpose(0, 2, 3, 1)
  assert relative_error(flax_eps, ref) <= 1e-4


def test_module_names_mirror_compvis_keys():
  cfg = ATTENTION_BLOCK_CONFIGS["church_like"]
  params = init_shapes(cfg)["params"]
  assert set(params["input_blocks_1_0"]) == {"in_layers_0", "in_layers_2", "emb_layers_1", "out_layers_0",
                                             "out_layers_3"}
  assert params["input_blocks_1_0"]["emb_layers_1"]["kernel"].shape == (128, 64)  # scale-shift: 2C
  assert set(params["input_blocks_1_1"]) == {"norm", "qkv", "proj_out"}
  assert {"time_embed_0", "time_embed_2", "out_0", "out_2", "middle_block_1"} <= set(params)
  cin = config_from_yaml(CIN_LIKE_YAML).unet
  block = init_shapes(cin)["params"]["input_blocks_1_1"]["transformer_blocks_0"]
  assert set(block) == {"attn1", "attn2", "ff", "norm1", "norm2", "norm3"}
  assert set(block["ff"]) == {"net_0", "net_2"} and set(block["attn2"]) == {"to_q", "to_k", "to_v", "to_out_0"}


def test_bad_inputs_give_clear_errors():
  cin = config_from_yaml(CIN_LIKE_YAML).unet
  model = LDMUNet(cin)
  x, t = jnp.zeros((1, 4, 4, 3)), jnp.zeros((1,), jnp.int32)
  # Zeros of the right shapes: every check below fires before any computation.
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), init_shapes(cin))
  with pytest.raises(ValueError, match="out of range"):
    model.apply(variables, x, t, jnp.array([11]))
  with pytest.raises(ValueError, match="class-conditional"):
    model.apply(variables, x, t)
  with pytest.raises(ValueError, match="multiples of 2"):
    model.apply(variables, jnp.zeros((1, 5, 4, 3)), t, jnp.array([1]))
  with pytest.raises(ValueError, match="num_heads or num_head_channels"):
    LDMUNetConfig(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=())


# ------------------------------------------------------------------------------------------------
# Parameter counts of the public presets


def _meta_count(build) -> int:
  with torch.device("meta"):
    model = build()
  return sum(p.numel() for p in model.parameters())


def _diffusers_preset_unet(name: str):
  """The diffusers model of the same configuration (UNet2DConditionModel or UNet2DModel)."""
  from diffusers import UNet2DConditionModel, UNet2DModel
  p = PRESETS[name].unet
  channels = tuple(p.model_channels * m for m in p.channel_mult)
  attn = [2 ** i in p.attention_resolutions for i in range(len(channels))]
  if p.use_spatial_transformer:
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1])
    return lambda: UNet2DConditionModel(
        sample_size=64, in_channels=p.in_channels, out_channels=p.out_channels, down_block_types=down,
        up_block_types=up, block_out_channels=channels, layers_per_block=p.num_res_blocks,
        cross_attention_dim=p.context_dim, attention_head_dim=p.num_heads)
  resample = "resnet" if p.resblock_updown else "conv"
  down = tuple("AttnDownBlock2D" if a else ("ResnetDownsampleBlock2D" if p.resblock_updown else "DownBlock2D")
               for a in attn)
  up = tuple("AttnUpBlock2D" if a else ("ResnetUpsampleBlock2D" if p.resblock_updown else "UpBlock2D")
             for a in attn[::-1])
  # Heads do not change the parameter count; diffusers' attention_head_dim is one number for all levels.
  return lambda: UNet2DModel(
      sample_size=64, in_channels=p.in_channels, out_channels=p.out_channels, down_block_types=down,
      up_block_types=up, block_out_channels=channels, layers_per_block=p.num_res_blocks,
      attention_head_dim=32, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
      resnet_time_scale_shift="scale_shift" if p.use_scale_shift_norm else "default",
      downsample_type=resample, upsample_type=resample,
      # diffusers drops the mid-block attention's GroupNorm with scale-shift unless told; openaimodel has it.
      attn_norm_num_groups=32)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_counts_match_diffusers_and_paper(name):
  preset = PRESETS[name]
  ours = count_params(init_shapes(preset.unet)["params"])
  table = 0
  if preset.unet.context_classes is not None:
    table = preset.unet.context_classes * preset.unet.context_dim
  assert ours - table == _meta_count(_diffusers_preset_unet(name))
  # Published diffusion-model sizes (LDM paper): 400M / 274M / 294M.
  assert abs(ours / 1e6 - preset.published_params) / preset.published_params < 0.01


def test_output_blocks_mark_their_skip_concatenation_for_shortcut_splitting():
  from msfp_jax import quant
  config = ATTENTION_BLOCK_CONFIGS["bedroom_like"]  # 32 / 64 channels, one ResBlock per level
  model = LDMUNet(config=config)
  variables = model.init(jax.random.key(0), *model.example_inputs(1))
  layers = quant.discover_layers(model, variables, *model.example_inputs(1))
  split = {path: info.act_split for path, info in layers.items() if info.act_split is not None}
  # Skips (conv_in 32, level-0 block 32, downsample 32, level-1 block 64) are popped in reverse; h is 64 wide
  # on level 1 and after its upsample, then 32. Every output block's skip_connection reads a join.
  assert split == {"output_blocks_0_0/skip_connection": 64, "output_blocks_1_0/skip_connection": 64,
                   "output_blocks_2_0/skip_connection": 64, "output_blocks_3_0/skip_connection": 32}
