"""diffusers UNet2DModel folders (config.json + diffusion_pytorch_model.{safetensors,bin}) -> DDPMUNet.

Only the UNet2DModel variants that are the DDPM UNet are accepted (positional timestep embedding, SiLU,
"default" time-embedding injection, ...; single- or multi-head attention); anything else is refused with the
config field that makes it different, rather than converted into a network that computes something else.
"""
from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from msfp_jax.models.convert.common import ConversionError, convert_state_dict
from msfp_jax.models.registry import abstract_params, save_converted
from msfp_jax.models.unet import DDPMUNet, DDPMUNetConfig, InvalidModelConfigError
from msfp_jax.torch_pickle import load_torch_file

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")


def diffusers_config_to_ddpm(config: dict[str, Any]) -> DDPMUNetConfig:
  """Maps a UNet2DModel config.json to a DDPMUNetConfig; raises ConversionError for what DDPM cannot express."""
  class_name = config.get("_class_name", "UNet2DModel")
  if class_name != "UNet2DModel":
    raise ConversionError(f"This is a diffusers {class_name}, not a UNet2DModel; only UNet2DModel (the pixel-space "
                          "DDPM UNet) converts to ddpm_unet.")
  get = lambda key, default: config.get(key, default) if config.get(key, default) is not None else default
  down = list(get("down_block_types", ()))
  up = list(get("up_block_types", ()))
  boc = list(get("block_out_channels", ()))
  refusals = []

  def require(key, allowed, default):
    value = config.get(key, default)
    if value not in allowed:
      refusals.append(f"{key}={value!r} (DDPM needs {' or '.join(map(repr, allowed))})")

  require("time_embedding_type", ("positional",), "positional")
  require("act_fn", ("silu", "swish"), "silu")
  require("resnet_time_scale_shift", ("default",), "default")
  require("center_input_sample", (False,), False)
  require("mid_block_type", ("UNetMidBlock2D",), "UNetMidBlock2D")
  require("downsample_type", ("conv",), "conv")
  require("upsample_type", ("conv",), "conv")
  require("class_embed_type", (None,), None)
  require("mid_block_scale_factor", (1, 1.0), 1)
  require("downsample_padding", (0, 1), 1)
  if not boc or len(down) != len(boc) or len(up) != len(boc):
    refusals.append(f"block_out_channels {boc}, down_block_types {down} and up_block_types {up} must be "
                    "non-empty and of equal length")
  bad_types = [t for t in down if t not in _DOWN_TYPES] + [t for t in up if t not in _UP_TYPES]
  if bad_types:
    refusals.append(f"block types {bad_types} (DDPM has only {_DOWN_TYPES + _UP_TYPES})")
  if refusals:
    raise ConversionError("This UNet2DModel is not a DDPM UNet: " + "; ".join(refusals) + ".")

  ch = boc[0]
  if any(c % ch for c in boc):
    raise ConversionError(f"block_out_channels {boc} are not multiples of the first ({ch}); DDPM's ch_mult must be "
                          "integers.")
  n = len(boc)
  attn_levels = [i for i, t in enumerate(down) if t == "AttnDownBlock2D"]
  up_attn_levels = [n - 1 - k for k, t in enumerate(up) if t == "AttnUpBlock2D"]
  if sorted(attn_levels) != sorted(up_attn_levels):
    raise ConversionError(f"Attention is at down levels {attn_levels} but at up levels {sorted(up_attn_levels)} "
                          f"(down_block_types {down}, up_block_types {up}); DDPM places attention at the same "
                          "resolutions on both paths.")
  time_dim = config.get("time_embedding_dim")
  if time_dim is not None and time_dim != 4 * ch:
    raise ConversionError(f"time_embedding_dim={time_dim}; DDPM's time embedding has 4 * ch = {4 * ch} channels.")
  # attention_head_dim is channels per head: every attention layer of width w has w // attention_head_dim
  # heads (unet_2d.py; null means one head of w channels). A missing key is UNet2DModel's default, 8.
  head_dim = config.get("attention_head_dim", 8)
  attn_widths = [boc[i] for i in attn_levels] + ([boc[-1]] if config.get("add_attention", True) else [])
  if head_dim is not None:
    if not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1:
      raise ConversionError(f"attention_head_dim={head_dim!r}; it must be null or a positive integer (channels "
                            "per attention head).")
    uneven = sorted({w for w in attn_widths if w % head_dim})
    if uneven:
      raise ConversionError(f"attention_head_dim={head_dim} does not divide the attention widths {uneven}: "
                            f"diffusers then projects q, k, v to (width // {head_dim}) * {head_dim} channels, "
                            "which DDPMUNet's attention (q, k, v as wide as the block) cannot express.")
    if all(w == head_dim for w in attn_widths):
      head_dim = None  # one head per attention layer (or no attention at all): the DDPM layout
  groups = config.get("norm_num_groups") or 32
  attn_groups = config.get("attn_norm_num_groups")
  if attn_groups is not None and attn_groups != groups:
    raise ConversionError(f"attn_norm_num_groups={attn_groups} differs from norm_num_groups={groups}; DDPM uses "
                          "one GroupNorm group count.")
  size = config.get("sample_size")
  if isinstance(size, (list, tuple)):
    if len(size) != 2 or size[0] != size[1]:
      raise ConversionError(f"sample_size={size}: DDPMUNet models square images only.")
    size = size[0]
  if size is None:
    raise ConversionError("config.json has no sample_size; the image resolution is needed to place attention.")
  try:
    return DDPMUNetConfig(
        resolution=int(size), in_channels=int(config.get("in_channels", 3)),
        out_channels=int(config.get("out_channels", 3)), ch=ch, ch_mult=tuple(c // ch for c in boc),
        num_res_blocks=int(config.get("layers_per_block", 2)),
        attn_resolutions=tuple(int(size) // 2 ** i for i in attn_levels),
        dropout=float(config.get("dropout", 0.0)), num_classes=config.get("num_class_embeds"),
        num_groups=groups, norm_eps=float(config.get("norm_eps", 1e-5)),
        flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)), freq_shift=float(config.get("freq_shift", 0)),
        downsample_padding=int(config.get("downsample_padding", 1)),
        mid_attention=bool(config.get("add_attention", True)), attn_head_channels=head_dim)
  except InvalidModelConfigError as e:
    raise ConversionError(f"The UNet2DModel config describes an impossible DDPM UNet: {e}") from e


def diffusers_module_for(config: DDPMUNetConfig):
  """Returns the Flax module path -> diffusers module name function for `config`."""
  levels = len(config.ch_mult)
  attn = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
  resnet = {"temb_proj": "time_emb_proj", "nin_shortcut": "conv_shortcut"}
  top = {"temb_dense_0": "time_embedding.linear_1", "temb_dense_1": "time_embedding.linear_2",
         "label_emb": "class_embedding", "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out",
         "mid_block_1": "mid_block.resnets.0", "mid_attn_1": "mid_block.attentions.0",
         "mid_block_2": "mid_block.resnets.1"}

  def name(path: tuple[str, ...]) -> str:
    head, rest = path[0], list(path[1:])
    if head in top:
      prefix = top[head]
    else:
      m = re.fullmatch(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?", head)
      if m is None:
        raise KeyError(head)
      side, level, kind, index = m.groups()
      block = f"down_blocks.{level}" if side == "down" else f"up_blocks.{levels - 1 - int(level)}"
      prefix = {"block": f"{block}.resnets.{index}", "attn": f"{block}.attentions.{index}",
                "downsample": f"{block}.downsamplers.0", "upsample": f"{block}.upsamplers.0"}[kind]
    if rest:
      is_attn = "attn" in head
      rest[0] = (attn if is_attn else resnet).get(rest[0], rest[0])
    return ".".join([prefix, *rest])

  return name


_LEGACY_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_attention_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
  """Old diffusers attention names (query/key/value/proj_attn) -> current ones (to_q/to_k/to_v/to_out.0)."""
  out = {}
  for key, value in state_dict.items():
    m = _LEGACY_ATTENTION.match(key)
    out[f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}" if m else key] = value
  return out


def convert_diffusers_state_dict(state_dict: dict[str, Any], config: DDPMUNetConfig) -> dict:
  """Flax params of DDPMUNet(config) from a UNet2DModel state dict (old or new attention names)."""
  expected = abstract_params(DDPMUNet(config=config))
  return convert_state_dict(rename_legacy_attention_keys(state_dict), expected, diffusers_module_for(config),
                            source="diffusers UNet2DModel state dict")


def find_unet_folder(src: pathlib.Path) -> pathlib.Path:
  """`src` itself, or its `unet/` subfolder when `src` is a whole diffusers pipeline folder."""
  if (src / "config.json").is_file():
    return src
  if (src / "model_index.json").is_file() and (src / "unet" / "config.json").is_file():
    return src / "unet"
  raise ConversionError(f"{src} is not a diffusers model folder: it has no config.json (nor a pipeline's "
                        "unet/config.json).")


def read_diffusers_config(folder: pathlib.Path) -> dict:
  """config.json of a diffusers model folder."""
  try:
    config = json.loads((folder / "config.json").read_text())
  except json.JSONDecodeError as e:
    raise ConversionError(f"{folder / 'config.json'} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise ConversionError(f"{folder / 'config.json'} is not a JSON object.")
  return config


def read_diffusers_weights(folder: pathlib.Path) -> dict[str, np.ndarray]:
  """The state dict of a diffusers model folder as numpy. No torch needed."""
  for name in WEIGHT_FILES:
    path = folder / name
    if path.is_file():
      return read_weights_file(path)
  raise ConversionError(f"{folder} has a config.json but no weights: expected one of {list(WEIGHT_FILES)}.")


def read_weights_file(path: pathlib.Path) -> dict[str, np.ndarray]:
  """A safetensors file (safetensors.numpy) or a PyTorch pickle (torch-free reader) as a flat numpy dict."""
  if path.suffix == ".safetensors":
    try:
      return dict(load_file(str(path)))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise ConversionError(f"{path} is not a readable safetensors file: {e}") from e
  try:
    obj = load_torch_file(path)
  except Exception as e:
    raise ConversionError(f"{path} is not a readable PyTorch file: {e}") from e
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    raise ConversionError(f"{path} does not hold a state dict (a flat mapping of names to tensors).")
  return dict(obj)


def convert_diffusers_unet(src: str | pathlib.Path, dst: str | pathlib.Path) -> DDPMUNetConfig:
  """Converts a diffusers UNet2DModel folder into a msfp_jax model directory; returns its config."""
  folder = find_unet_folder(pathlib.Path(src))
  raw_config = read_diffusers_config(folder)
  config = diffusers_config_to_ddpm(raw_config)  # refuse other architectures before reading any weights
  state_dict = read_diffusers_weights(folder)
  params = convert_diffusers_state_dict(state_dict, config)
  save_converted(dst, "ddpm_unet", config, params, extra_config={
      "source": {"format": "diffusers_unet2d", "path": str(src)},
      "num_train_timesteps": raw_config.get("num_train_timesteps")})
  return config
