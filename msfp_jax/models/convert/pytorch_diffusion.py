"""pytorch_diffusion / DDIM checkpoints -> DDPMUNet.

Accepted inputs (see docs/checkpoints.md):
  * a state dict (`model-790000.ckpt`, EMA files), keys possibly prefixed `module.` (DataParallel);
  * the DDIM runner's list `[model, optimizer, epoch, step, ema]`: the EMA state (last element) by default.

The architecture is inferred from the weights (ch, ch_mult, res blocks, attention levels, resampling); the
resolution, which weights do not determine, comes from a matching preset (cifar10, celeba), an explicit
config / preset, or `resolution=`. With an explicit config every disagreement is reported by key.
"""
from __future__ import annotations

import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from msfp_jax.models.convert.common import ConversionError, convert_state_dict, strip_prefix
from msfp_jax.models.registry import abstract_params, save_converted
from msfp_jax.models.unet import PRESETS, DDPMUNet, DDPMUNetConfig, InvalidModelConfigError

MARKER_KEYS = ("temb.dense.0.weight", "conv_in.weight", "conv_out.weight")


def is_pytorch_diffusion_state_dict(obj: Any) -> bool:
  """True for a mapping with the DDPM UNet's characteristic keys (after removing a `module.` prefix)."""
  if not isinstance(obj, Mapping) or not obj:
    return False
  keys = strip_prefix({str(k): None for k in obj}, "module.")
  return all(k in keys for k in MARKER_KEYS)


def extract_state_dict(obj: Any, *, use_ema: bool = True) -> dict[str, np.ndarray]:
  """The UNet state dict inside a pytorch_diffusion / DDIM checkpoint object, `module.` prefix removed."""
  if isinstance(obj, (list, tuple)):
    # DDIM runner: [model, optimizer, epoch, step] + [ema] when EMA was on.
    dicts = [i for i, x in enumerate(obj) if is_pytorch_diffusion_state_dict(x)]
    if not dicts:
      raise ConversionError(f"This list checkpoint ({len(obj)} elements) holds no DDPM UNet state dict; expected "
                            "the DDIM runner's [model, optimizer, epoch, step, ema].")
    if use_ema:
      if len(obj) < 5 or dicts[-1] != len(obj) - 1:
        raise ConversionError(f"This DDIM checkpoint ({len(obj)} elements) has no EMA state as its last element "
                              "(it was saved with EMA off); convert the raw weights with --no-ema.")
      obj = obj[-1]
    else:
      obj = obj[dicts[0]]
  if not is_pytorch_diffusion_state_dict(obj):
    keys = list(obj)[:8] if isinstance(obj, Mapping) else []
    raise ConversionError(f"Not a pytorch_diffusion DDPM UNet state dict: expected keys {list(MARKER_KEYS)}; "
                          f"found {type(obj).__name__} with keys {keys}.")
  state_dict = strip_prefix({str(k): v for k, v in obj.items()}, "module.")
  not_arrays = [k for k, v in state_dict.items() if not hasattr(v, "shape")]
  if not_arrays:
    raise ConversionError(f"State dict entries {not_arrays[:10]} are not tensors.")
  return state_dict


def _levels(state_dict: Mapping[str, Any], pattern: str) -> list[int]:
  return sorted({int(m[1]) for k in state_dict for m in [re.match(pattern, k)] if m})


def infer_config(state_dict: Mapping[str, Any], *, resolution: int | None = None,
                 dropout: float | None = None) -> DDPMUNetConfig:
  """The DDPMUNetConfig the weights describe.

  Without `resolution`, the resolution of the preset with the same architecture is used; a checkpoint that
  matches no preset needs `resolution`.
  """
  ch, in_channels = np.shape(state_dict["conv_in.weight"])[:2]
  out_channels = np.shape(state_dict["conv_out.weight"])[0]
  levels = _levels(state_dict, r"down\.(\d+)\.")
  if not levels or levels != list(range(len(levels))):
    raise ConversionError(f"Cannot infer the resolution levels from keys down.<i>.*: found levels {levels}.")
  blocks = _levels(state_dict, r"down\.0\.block\.(\d+)\.")
  ch_mult = []
  for i in levels:
    key = f"down.{i}.block.0.conv1.weight"
    if key not in state_dict:
      raise ConversionError(f"Cannot infer ch_mult: key {key} is missing.")
    width = np.shape(state_dict[key])[0]
    if width % ch:
      raise ConversionError(f"{key} has {width} output channels, not a multiple of ch={ch} (conv_in.weight).")
    ch_mult.append(width // ch)
  attn_levels = _levels(state_dict, r"down\.(\d+)\.attn\.")
  fields = dict(in_channels=int(in_channels), out_channels=int(out_channels), ch=int(ch), ch_mult=tuple(ch_mult),
                num_res_blocks=len(blocks),
                resamp_with_conv=len(levels) == 1 or "down.0.downsample.conv.weight" in state_dict,
                mid_attention=any(k.startswith("mid.attn_1.") for k in state_dict))
  if resolution is None:
    for p in PRESETS.values():
      same = all(getattr(p, k) == v for k, v in fields.items())
      if same and [p.level_resolutions.index(r) for r in p.attn_resolutions] == attn_levels:
        resolution = p.resolution
        dropout = p.dropout if dropout is None else dropout
        break
    else:
      raise ConversionError(
          f"The weights describe a DDPM UNet (ch={ch}, ch_mult={tuple(ch_mult)}, num_res_blocks={len(blocks)}, "
          f"attention at levels {attn_levels}) that matches no preset ({sorted(PRESETS)}); its image resolution "
          "cannot be read from the weights. Pass it: --config model.yaml (DDIM config) or --resolution N.")
  try:
    return DDPMUNetConfig(resolution=resolution, attn_resolutions=tuple(resolution // 2 ** i for i in attn_levels),
                          dropout=0.0 if dropout is None else dropout, **fields)
  except InvalidModelConfigError as e:
    raise ConversionError(f"The weights describe an impossible DDPM UNet at resolution {resolution}: {e}") from e


def pytorch_diffusion_module_for(path: tuple[str, ...]) -> str:
  """Flax module path -> pytorch_diffusion module name: down_0_block_1/conv1 -> down.0.block.1.conv1."""
  head = path[0]
  m = re.fullmatch(r"(down|up)_(\d+)_(block|attn)_(\d+)", head)
  if m:
    prefix = f"{m[1]}.{m[2]}.{m[3]}.{m[4]}"
  elif m := re.fullmatch(r"(down|up)_(\d+)_(downsample|upsample)", head):
    prefix = f"{m[1]}.{m[2]}.{m[3]}"
  elif m := re.fullmatch(r"mid_(block_\d+|attn_\d+)", head):
    prefix = f"mid.{m[1]}"
  elif m := re.fullmatch(r"temb_dense_(\d+)", head):
    prefix = f"temb.dense.{m[1]}"
  else:
    prefix = head  # conv_in, norm_out, conv_out, label_emb
  return ".".join([prefix, *path[1:]])


def convert_pytorch_diffusion_state_dict(state_dict: Mapping[str, Any], config: DDPMUNetConfig, *,
                                         hint: str = "") -> dict:
  """Flax params of DDPMUNet(config) from a pytorch_diffusion state dict (no prefix)."""
  expected = abstract_params(DDPMUNet(config=config))
  return convert_state_dict(state_dict, expected, pytorch_diffusion_module_for,
                            source="pytorch_diffusion state dict", hint=hint)


def config_from_mapping(mapping: Mapping[str, Any]) -> DDPMUNetConfig:
  """A DDPMUNetConfig from a DDIM YAML config ({data: {image_size}, model: {ch, ch_mult, ...}}), a
  model_config.json ({architecture, config}) or a flat DDPMUNetConfig dict."""
  if "model" in mapping and isinstance(mapping["model"], Mapping):
    model, data = mapping["model"], mapping.get("data", {}) or {}
    if "image_size" not in data:
      raise ConversionError("The DDIM config has no data.image_size (the model's resolution).")
    translated = dict(resolution=data["image_size"], in_channels=model.get("in_channels", 3),
                      out_channels=model.get("out_ch", 3), ch=model.get("ch", 128),
                      ch_mult=tuple(model.get("ch_mult", (1, 2, 2, 2))),
                      num_res_blocks=model.get("num_res_blocks", 2),
                      attn_resolutions=tuple(model.get("attn_resolutions", (16,))),
                      dropout=model.get("dropout", 0.0), resamp_with_conv=model.get("resamp_with_conv", True))
  elif "config" in mapping and isinstance(mapping["config"], Mapping):
    if mapping.get("architecture", "ddpm_unet") != "ddpm_unet":
      raise ConversionError(f"The config is for architecture {mapping['architecture']!r}, not ddpm_unet.")
    translated = dict(mapping["config"])
  else:
    translated = dict(mapping)
  try:
    return DDPMUNetConfig(**translated)
  except (TypeError, InvalidModelConfigError) as e:
    raise ConversionError(f"Invalid DDPM UNet config: {e}") from e


def convert_pytorch_diffusion(obj: Any, dst: str | pathlib.Path, *, config: DDPMUNetConfig | None = None,
                              resolution: int | None = None, use_ema: bool = True,
                              source: str = "") -> DDPMUNetConfig:
  """Converts a loaded pytorch_diffusion / DDIM checkpoint object into a msfp_jax model directory.

  Args:
    obj: what `load_torch_file` returned (a state dict or the DDIM list).
    dst: output directory.
    config: the architecture; inferred from the weights when None.
    resolution: image resolution for an inferred config that matches no preset.
    use_ema: for the DDIM list, take the EMA state (last element); False takes the raw model state.
    source: recorded in model_config.json.
  Returns:
    The config used.
  """
  state_dict = extract_state_dict(obj, use_ema=use_ema)
  hint = ""
  if config is None:
    config = infer_config(state_dict, resolution=resolution)
  else:
    hint = "The given config (--config/--preset) does not describe these weights; check the named keys."
  params = convert_pytorch_diffusion_state_dict(state_dict, config, hint=hint)
  save_converted(dst, "ddpm_unet", config, params, extra_config={
      "source": {"format": "pytorch_diffusion" if not isinstance(obj, (list, tuple)) else "ddim_list",
                 "path": source, "ema": bool(use_ema) if isinstance(obj, (list, tuple)) else None}})
  return config
