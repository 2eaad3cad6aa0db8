"""CompVis latent-diffusion Lightning checkpoints -> msfp_jax model directories.

A CompVis checkpoint is `{"state_dict": {...}, "epoch", "global_step", ...}` whose state dict holds
  model.diffusion_model.*   the openaimodel UNet                 -> DST/params ("ldm_unet")
  model_ema.*               its EMA copy, names with the dots removed
                            (LitEma: "model_ema." + "diffusion_model.input_blocks.0.0.weight" without dots)
  first_stage_model.*       the VQ / KL autoencoder              -> DST/first_stage_params
  cond_stage_model.embedding.weight   the class table (cin256)   -> inside the UNet params
  scale_factor, betas, alphas_cumprod, ... (buffers: read where useful, otherwise ignored)
The architecture comes from the checkpoint's YAML (`--config model.yaml`), from a built-in preset
(msfp_jax.models.ldm_presets) or, when neither is given, from recognising one of the presets by its
weight shapes. Every network weight is checked against the configured architecture: a missing,
unexpected or mis-shaped one is reported by name in one `ConversionError`.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from msfp_jax import checkpoint
from msfp_jax.models import autoencoder, ldm_presets
from msfp_jax.models.autoencoder import AutoencoderConfig
from msfp_jax.models.convert.common import ConversionError, convert_state_dict, read_yaml
from msfp_jax.models.ldm_unet import LDMUNetConfig, init_shapes
from msfp_jax.models.registry import MODEL_CONFIG_FILE, save_converted

UNET_PREFIX = "model.diffusion_model."
EMA_PREFIX = "model_ema."
FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model."
# Buffers of LitEma that are not weights.
EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
# Autoencoder checkpoints may carry their training loss (LPIPS, discriminator) under first_stage_model.loss.
FIRST_STAGE_IGNORED = (FIRST_STAGE_PREFIX + "loss.",)

_LOG = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LDMConfig:
  """Everything but the weights: what a CompVis YAML or a preset says.

  Attributes:
    unet: the diffusion model.
    first_stage_architecture: "vq_f4" or "kl_f8".
    first_stage: the autoencoder.
    scale_factor: latent scale (the checkpoint's `scale_factor` buffer wins when it has one).
    scale_by_std: the checkpoint must carry its fitted `scale_factor` buffer.
    conditioning: {"kind": "none"} or {"kind": "class", "num_classes", "null_class"}.
    schedule: {"kind", "beta_start", "beta_end", "num_timesteps"}: the arguments of msfp_jax.diffusion.make_schedule.
    source: where this came from ("preset cin256-v2", "config model.yaml"), for messages.
  """
  unet: LDMUNetConfig
  first_stage_architecture: str
  first_stage: AutoencoderConfig
  scale_factor: float = 1.0
  scale_by_std: bool = False
  conditioning: dict = dataclasses.field(default_factory=lambda: {"kind": "none"})
  schedule: dict = dataclasses.field(default_factory=dict)
  source: str = ""


def config_from_preset(name: str) -> LDMConfig:
  """The LDMConfig of a built-in preset (see msfp_jax.models.ldm_presets.PRESETS)."""
  try:
    p = ldm_presets.get_preset(name)
  except ValueError as e:
    raise ConversionError(str(e)) from e
  return LDMConfig(unet=p.unet, first_stage_architecture=p.first_stage_architecture, first_stage=p.first_stage,
                   scale_factor=p.scale_factor, scale_by_std=p.scale_by_std, conditioning=p.conditioning,
                   schedule=p.schedule, source=f"preset {p.name}")


# --------------------------------------------------------------------------------------------------
# YAML

# openaimodel.UNetModel arguments: ours, and those that do not change inference (with the value they
# must have when they would).
_UNET_FIELDS = {"in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
                "attention_resolutions", "num_heads", "num_head_channels", "num_heads_upsample",
                "use_scale_shift_norm", "resblock_updown", "use_spatial_transformer", "transformer_depth",
                "context_dim", "num_classes", "conv_resample", "image_size"}
_UNET_IGNORED = {"use_checkpoint", "use_fp16", "dropout", "legacy"}
_UNET_REQUIRED_VALUE = {"dims": 2, "use_new_attention_order": False, "n_embed": None,
                        "use_linear_in_transformer": False}
_DDCONFIG_FIELDS = {"ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "in_channels",
                    "out_ch", "z_channels", "double_z"}
_DDCONFIG_IGNORED = {"dropout"}
_DDCONFIG_REQUIRED_VALUE = {"resamp_with_conv": True, "attn_type": "vanilla", "use_linear_attn": False,
                            "give_pre_end": False, "tanh_out": False}
_FIRST_STAGE_IGNORED = {"ckpt_path", "monitor", "lossconfig", "ignore_keys", "image_key", "colorize_nlabels",
                        "sane_index_shape", "batch_resize_range", "scheduler_config", "lr_g_factor",
                        "use_ema"}
_FIRST_STAGE_REQUIRED_VALUE = {"remap": None}
# ldm.modules.diffusionmodules.util.make_beta_schedule -> the recorded schedule kinds (msfp_jax.diffusion's
# make_schedule names; the model directory records the schedule as data, its users build it).
_BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "cosine"}
# make_beta_schedule's cosine offset s.
_COSINE_OFFSET = 8e-3


def _require(mapping: Mapping, key: str, where: str):
  if not isinstance(mapping, Mapping) or key not in mapping:
    raise ConversionError(f"The LDM config lacks {where}.{key}.")
  return mapping[key]


def _check_fields(params: Mapping, known: set, ignored: set, required_value: dict, where: str) -> None:
  for key, value in params.items():
    if key in known or key in ignored:
      continue
    if key in required_value:
      if value != required_value[key]:
        raise ConversionError(f"{where}.{key} = {value!r} is not supported (only {required_value[key]!r}).")
      continue
    raise ConversionError(f"Unknown key {where}.{key} in the LDM config; known: "
                          f"{sorted(known | ignored | set(required_value))}.")


def _target_name(section: Any, where: str) -> str:
  if isinstance(section, str):
    return section
  return str(_require(section, "target", where))


def config_from_yaml(source: str | os.PathLike | Mapping) -> LDMConfig:
  """Parses a CompVis latent-diffusion YAML (the `--config` of their scripts) into an LDMConfig.

  Reads model.params.{unet_config, first_stage_config, cond_stage_config, scale_factor, scale_by_std,
  linear_start, linear_end, timesteps, beta_schedule, parameterization}. Anything that would change the
  network but is not supported is an error naming the key.
  """
  if isinstance(source, Mapping):
    data, name = source, "mapping"
  else:
    data, name = read_yaml(source, what="LDM config"), str(pathlib.Path(source))
  model = _require(data, "model", "(top level)")
  params = _require(model, "params", "model")

  parameterization = params.get("parameterization", "eps")
  if parameterization != "eps":
    raise ConversionError(f"model.params.parameterization = {parameterization!r}: only 'eps' models are supported.")

  unet_section = _require(params, "unet_config", "model.params")
  target = _target_name(unet_section, "model.params.unet_config")
  if not target.endswith("openaimodel.UNetModel"):
    raise ConversionError(f"model.params.unet_config.target = {target!r}: only "
                          "ldm.modules.diffusionmodules.openaimodel.UNetModel is supported.")
  unet_params = dict(_require(unet_section, "params", "model.params.unet_config"))
  _check_fields(unet_params, _UNET_FIELDS, _UNET_IGNORED, _UNET_REQUIRED_VALUE, "model.params.unet_config.params")
  unet_kwargs = {k: v for k, v in unet_params.items() if k in _UNET_FIELDS}
  if "transformer_depth" in unet_kwargs and unet_kwargs["transformer_depth"] is None:
    unet_kwargs.pop("transformer_depth")

  conditioning: dict = {"kind": "none"}
  cond = params.get("cond_stage_config", "__is_unconditional__")
  cond_target = _target_name(cond, "model.params.cond_stage_config")
  if cond_target == "__is_unconditional__":
    if params.get("conditioning_key") not in (None, "None"):
      raise ConversionError(f"model.params.conditioning_key = {params.get('conditioning_key')!r} with an "
                            "unconditional cond stage is not supported.")
  elif cond_target.endswith("ClassEmbedder"):
    if params.get("conditioning_key") != "crossattn":
      raise ConversionError("a ClassEmbedder cond stage is supported with conditioning_key: crossattn only, "
                            f"got {params.get('conditioning_key')!r}.")
    cond_params = dict(cond.get("params") or {})
    n_classes = int(cond_params.get("n_classes", 1000))
    embed_dim = int(_require(cond_params, "embed_dim", "model.params.cond_stage_config.params"))
    if unet_kwargs.get("context_dim") != embed_dim:
      raise ConversionError(f"model.params.cond_stage_config.params.embed_dim = {embed_dim} differs from "
                            f"unet_config.params.context_dim = {unet_kwargs.get('context_dim')}.")
    unet_kwargs["context_classes"] = n_classes
    # CompVis cin256: n_classes = 1001, the last row is the "no class" of classifier-free guidance.
    conditioning = {"kind": "class", "num_classes": n_classes - 1, "null_class": n_classes - 1}
  else:
    raise ConversionError(f"model.params.cond_stage_config.target = {cond_target!r} is not supported "
                          "(only unconditional models and ClassEmbedder class conditioning).")
  try:
    unet = LDMUNetConfig(**unet_kwargs)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"model.params.unet_config.params: {e}") from e

  fs_section = _require(params, "first_stage_config", "model.params")
  fs_target = _target_name(fs_section, "model.params.first_stage_config")
  if fs_target.endswith(("VQModelInterface", "VQModel")):
    architecture = "vq_f4"
  elif fs_target.endswith("AutoencoderKL"):
    architecture = "kl_f8"
  else:
    raise ConversionError(f"model.params.first_stage_config.target = {fs_target!r} is not supported "
                          "(VQModelInterface or AutoencoderKL).")
  fs_params = dict(_require(fs_section, "params", "model.params.first_stage_config"))
  ddconfig = dict(_require(fs_params, "ddconfig", "model.params.first_stage_config.params"))
  _check_fields({k: v for k, v in fs_params.items() if k not in ("ddconfig", "embed_dim", "n_embed")},
                set(), _FIRST_STAGE_IGNORED, _FIRST_STAGE_REQUIRED_VALUE, "model.params.first_stage_config.params")
  _check_fields(ddconfig, _DDCONFIG_FIELDS, _DDCONFIG_IGNORED, _DDCONFIG_REQUIRED_VALUE,
                "model.params.first_stage_config.params.ddconfig")
  fs_kwargs = {k: v for k, v in ddconfig.items() if k in _DDCONFIG_FIELDS}
  fs_kwargs["embed_dim"] = int(_require(fs_params, "embed_dim", "model.params.first_stage_config.params"))
  if architecture == "vq_f4":
    fs_kwargs["n_embed"] = int(_require(fs_params, "n_embed", "model.params.first_stage_config.params"))
  try:
    first_stage = AutoencoderConfig(**fs_kwargs)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"model.params.first_stage_config.params.ddconfig: {e}") from e
  if architecture == "kl_f8" and not first_stage.double_z:
    raise ConversionError("model.params.first_stage_config: AutoencoderKL needs ddconfig.double_z: true.")

  beta_schedule = params.get("beta_schedule", "linear")
  if beta_schedule not in _BETA_SCHEDULES:
    raise ConversionError(f"model.params.beta_schedule = {beta_schedule!r} is not supported; "
                          f"choose one of {sorted(_BETA_SCHEDULES)}.")
  schedule = {"kind": _BETA_SCHEDULES[beta_schedule],
              "beta_start": float(params.get("linear_start", 1e-4)),
              "beta_end": float(params.get("linear_end", 2e-2)),
              "num_timesteps": int(params.get("timesteps", 1000))}
  return LDMConfig(unet=unet, first_stage_architecture=architecture, first_stage=first_stage,
                   scale_factor=float(params.get("scale_factor", 1.0)),
                   scale_by_std=bool(params.get("scale_by_std", False)), conditioning=conditioning,
                   schedule=schedule, source=f"config {name}")


# --------------------------------------------------------------------------------------------------
# Key naming

_INDEXED = re.compile(r"(.*?)((?:_\d+)+)")


def _dotted(component: str) -> str:
  """'input_blocks_1_0' -> 'input_blocks.1.0'; 'attn1' and 'skip_connection' stay."""
  match = _INDEXED.fullmatch(component)
  if not match or not match.group(1):
    return component
  return match.group(1) + match.group(2).replace("_", ".")


def _torch_name(path: tuple[str, ...]) -> str:
  parts = []
  for i, component in enumerate(path):
    # The autoencoders' `mid.block_1` / `mid.attn_1` carry their index in the name itself.
    parts.append(component if i and path[i - 1] == "mid" else _dotted(component))
  return ".".join(parts)


def unet_torch_module(path: tuple[str, ...]) -> str:
  """Flax LDMUNet module path -> CompVis module name (with its model.diffusion_model. prefix)."""
  if path and path[0] == "cond_stage_model":
    return _torch_name(path)
  return UNET_PREFIX + _torch_name(path)


def first_stage_torch_module(path: tuple[str, ...]) -> str:
  """Flax autoencoder module path -> CompVis module name (with its first_stage_model. prefix)."""
  if path == ("quantize",):
    return FIRST_STAGE_PREFIX + "quantize.embedding"
  return FIRST_STAGE_PREFIX + _torch_name(path)


def ema_key(raw_key: str) -> str:
  """'model.diffusion_model.input_blocks.0.0.weight' -> 'model_ema.diffusion_modelinput_blocks00weight'."""
  return EMA_PREFIX + raw_key[len("model."):].replace(".", "")


# --------------------------------------------------------------------------------------------------
# Checkpoint reading


def compvis_state_dict(checkpoint_obj: Any) -> dict[str, Any]:
  """The state dict of a CompVis checkpoint object (Lightning dict with 'state_dict', or the dict itself)."""
  obj = checkpoint_obj
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping) or not any(str(k).startswith((UNET_PREFIX, EMA_PREFIX)) for k in obj):
    raise ConversionError("Not a CompVis latent-diffusion checkpoint: expected a 'state_dict' with "
                          f"{UNET_PREFIX}* (or {EMA_PREFIX}*) keys.")
  return {str(k): v for k, v in obj.items()}


def detect_first_stage(state_dict: Mapping[str, Any]) -> str:
  """'vq_f4' (has a codebook) or 'kl_f8' (quant_conv gives mean and log-variance)."""
  if FIRST_STAGE_PREFIX + "quantize.embedding.weight" in state_dict:
    return "vq_f4"
  if FIRST_STAGE_PREFIX + "quant_conv.weight" in state_dict:
    return "kl_f8"
  raise ConversionError(f"The checkpoint has no first-stage autoencoder ({FIRST_STAGE_PREFIX}quant_conv.weight "
                        f"missing); a CompVis LDM checkpoint carries it under {FIRST_STAGE_PREFIX}*.")


def _describe_first_stage(state_dict: Mapping[str, Any], kind: str) -> str:
  if kind == "vq_f4":
    shape = np.shape(state_dict[FIRST_STAGE_PREFIX + "quantize.embedding.weight"])
    return f"a VQ autoencoder (codebook quantize.embedding {tuple(shape)})"
  shape = np.shape(state_dict[FIRST_STAGE_PREFIX + "quant_conv.weight"])
  return f"a KL autoencoder (no codebook; quant_conv {tuple(shape)} gives mean and log-variance)"


def detect_preset(state_dict: Mapping[str, Any]) -> str:
  """Recognises which public checkpoint a state dict is, from a few weight shapes."""
  matches = []
  first_stage = detect_first_stage(state_dict)
  key = "input_blocks.0.0.weight"
  for name, preset in ldm_presets.PRESETS.items():
    shape = None
    for candidate in (UNET_PREFIX + key, ema_key(UNET_PREFIX + key)):
      if candidate in state_dict:
        shape = tuple(np.shape(state_dict[candidate]))
        break
    if shape != (preset.unet.model_channels, preset.unet.in_channels, 3, 3):
      continue
    if first_stage != preset.first_stage_architecture:
      continue
    if (preset.unet.context_classes is not None) != (COND_STAGE_PREFIX + "embedding.weight" in state_dict):
      continue
    matches.append(name)
  if len(matches) != 1:
    raise ConversionError("Cannot tell which LDM this checkpoint is; give its CompVis YAML "
                          f"(--config model.yaml) or a preset (--preset, one of {sorted(ldm_presets.PRESETS)}).")
  return matches[0]


def _float_buffer(state_dict, key) -> float | None:
  if key not in state_dict:
    return None
  value = np.asarray(state_dict[key], dtype=np.float64)
  if value.size != 1 or not np.isfinite(value).all():
    raise ConversionError(f"Checkpoint buffer {key!r} must be one finite number, got shape {value.shape}.")
  return float(value.reshape(()))


def compvis_betas(schedule: Mapping[str, Any]) -> np.ndarray:
  """The betas (float64 [T]) CompVis' make_beta_schedule makes for a recorded schedule {"kind", ...}.

  Written from the checkpoint format's own definition rather than taken from msfp_jax.diffusion, so that the
  converters know nothing of the diffusion package; a test checks both give the same betas for every kind.
  """
  kind, num_timesteps = schedule["kind"], int(schedule["num_timesteps"])
  start, end = float(schedule["beta_start"]), float(schedule["beta_end"])
  if kind == "cosine":
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps + _COSINE_OFFSET
    alphas_cumprod = np.cos(steps / (1 + _COSINE_OFFSET) * np.pi / 2) ** 2
    return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0.0, 0.999)
  if kind not in _BETA_SCHEDULES.values():
    raise ValueError(f"unknown schedule kind {kind!r}; one of {sorted(_BETA_SCHEDULES.values())}")
  if not 0 < start <= end < 1:
    raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={start}, beta_end={end}")
  if kind == "scaled_linear":  # CompVis "linear": sqrt(beta) evenly spaced
    return np.linspace(start ** 0.5, end ** 0.5, num_timesteps, dtype=np.float64) ** 2
  return np.linspace(start, end, num_timesteps, dtype=np.float64)  # CompVis "sqrt_linear"


def _check_schedule(state_dict, config: LDMConfig) -> None:
  """The checkpoint's `betas` buffer (when present) must be the configured schedule."""
  if "betas" not in state_dict or not config.schedule:
    return
  betas = np.asarray(state_dict["betas"], dtype=np.float64).reshape(-1)
  s = config.schedule
  try:
    expected = compvis_betas(s)
  except ValueError as e:
    raise ConversionError(f"{config.source}: invalid noise schedule {s}: {e}") from e
  if betas.shape != expected.shape or not np.allclose(betas, expected, rtol=1e-5, atol=1e-9):
    raise ConversionError(
        f"Checkpoint key 'betas' ({betas.size} steps, beta_1={betas[0]:.6g}, beta_T={betas[-1]:.6g}) does not "
        f"match the noise schedule of {config.source} ({s}); use the YAML that belongs to this checkpoint.")


def _select_unet_weights(state_dict: Mapping[str, Any], expected_keys: list[str], use_ema: bool
                         ) -> tuple[dict[str, Any], str]:
  """The UNet + cond-stage state dict under CompVis raw names, from the EMA copy or the raw weights."""
  has_raw = any(k.startswith(UNET_PREFIX) for k in state_dict)
  ema_keys = {k for k in state_dict if k.startswith(EMA_PREFIX) and k not in EMA_BOOKKEEPING}
  cond = {k: v for k, v in state_dict.items() if k.startswith(COND_STAGE_PREFIX)}
  if not use_ema:
    if not has_raw:
      raise ConversionError(f"Non-EMA weights were requested (use_ema=False / --no-ema), but the checkpoint holds "
                            f"only the EMA copy ({EMA_PREFIX}*) of the diffusion model; convert without --no-ema.")
    return {**{k: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}, **cond}, "raw"
  if not ema_keys:
    if not has_raw:
      raise ConversionError(f"The checkpoint holds no diffusion-model weights ({UNET_PREFIX}* or {EMA_PREFIX}*).")
    _LOG.info("The checkpoint has no EMA copy (%s*); using the raw weights.", EMA_PREFIX)
    return {**{k: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}, **cond}, "raw (no EMA in file)"
  selected, used = dict(cond), set()
  for key in expected_keys:
    if key.startswith(UNET_PREFIX) and ema_key(key) in state_dict:
      selected[key] = state_dict[ema_key(key)]
      used.add(ema_key(key))
  for key in sorted(ema_keys - used):  # reported as unexpected by convert_state_dict
    selected[key] = state_dict[key]
  return selected, "ema"


def convert_compvis_state_dict(state_dict: Mapping[str, Any], config: LDMConfig, *, use_ema: bool = True
                               ) -> tuple[dict, dict, dict]:
  """(UNet params, first-stage params, info) from a CompVis state dict; info has "weights",
  "scale_factor". Raises ConversionError naming every missing / unexpected / mis-shaped key."""
  detected = detect_first_stage(state_dict)
  if detected != config.first_stage_architecture:
    raise ConversionError(
        f"Wrong first stage for {config.source}: it expects a {config.first_stage_architecture} autoencoder, but "
        f"the checkpoint's {FIRST_STAGE_PREFIX}* is {_describe_first_stage(state_dict, detected)}. Use the "
        "preset or YAML that belongs to this checkpoint.")
  _check_schedule(state_dict, config)

  unet_target = init_shapes(config.unet)["params"]
  unet_sd, weights = _select_unet_weights(state_dict, [_expected_key(path) for path in _leaf_paths(unet_target)],
                                          use_ema)
  hint = (f"(architecture from {config.source}"
          + ("; diffusion-model weights read from the EMA copy model_ema.<name without dots>, or pass "
             "use_ema=False / --no-ema for the raw ones" if weights == "ema" else "") + ").")
  unet_params = convert_state_dict(unet_sd, unet_target, unet_torch_module, source="checkpoint's UNet", hint=hint)

  fs_sd = {k: v for k, v in state_dict.items()
           if k.startswith(FIRST_STAGE_PREFIX) and not k.startswith(FIRST_STAGE_IGNORED)}
  fs_target = autoencoder.init_shapes(config.first_stage_architecture, config.first_stage)["params"]
  fs_params = convert_state_dict(fs_sd, fs_target, first_stage_torch_module, source="checkpoint's first stage",
                                 hint=f"(architecture from {config.source}).")

  scale_factor = _float_buffer(state_dict, "scale_factor")
  if scale_factor is None:
    if config.scale_by_std:
      raise ConversionError(f"{config.source} fits its latent scale to the data (scale_by_std), but the "
                            "checkpoint has no 'scale_factor' buffer.")
    scale_factor = config.scale_factor
  if not scale_factor > 0:
    raise ConversionError(f"The latent scale_factor must be positive, got {scale_factor}.")
  return unet_params, fs_params, {"weights": weights, "scale_factor": scale_factor}


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def _leaf_paths(tree) -> list[tuple[str, ...]]:
  return [tuple(p.key for p in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _expected_key(path: tuple[str, ...]) -> str:
  return f"{unet_torch_module(path[:-1])}.{_TORCH_LEAF[path[-1]]}"


def convert_compvis(checkpoint_obj: Any, dst: str | os.PathLike, *, config_yaml: str | os.PathLike | None = None,
                    preset: str | None = None, use_ema: bool = True) -> dict:
  """Converts a loaded CompVis LDM checkpoint into DST (UNet, first stage, conditioning, schedule).

  Args:
    checkpoint_obj: the loaded file (msfp_jax.torch_pickle.load_torch_file), a Lightning
      dict with "state_dict" or the state dict itself.
    dst: output directory; `msfp_jax.models.load(dst)` returns the UNet, `load_first_stage(dst)` the
      autoencoder (msfp_jax.models.ldm_unet).
    config_yaml: the checkpoint's CompVis YAML (path). Exclusive with `preset`.
    preset: a built-in configuration (msfp_jax.models.ldm_presets). With neither, the preset is
      recognised from the weight shapes.
    use_ema: take the EMA copy when the file has one (otherwise the raw weights, noted in the config);
      False insists on the raw weights (an error when the file holds only the EMA copy).

  Returns:
    The written model_config dict.
  """
  if config_yaml is not None and preset is not None:
    raise ValueError("Give either config_yaml (--config) or preset (--preset), not both.")
  state_dict = compvis_state_dict(checkpoint_obj)
  if config_yaml is not None:
    config = config_from_yaml(config_yaml)
  else:
    config = config_from_preset(preset if preset is not None else detect_preset(state_dict))
  unet_params, fs_params, info = convert_compvis_state_dict(state_dict, config, use_ema=use_ema)
  dst = pathlib.Path(dst)
  save_converted(
      dst, "ldm_unet", config.unet.to_dict(), unet_params,
      extra_trees={"first_stage_params": fs_params},
      extra_config={
          "first_stage": {"architecture": config.first_stage_architecture,
                          "config": config.first_stage.to_dict(), "scale_factor": info["scale_factor"]},
          "conditioning": dict(config.conditioning),
          "schedule": dict(config.schedule),
          "source": {"format": "compvis", "from": config.source, "weights": info["weights"]},
      })
  return checkpoint.load_json(dst / MODEL_CONFIG_FILE)


__all__ = ["LDMConfig", "compvis_betas", "compvis_state_dict", "config_from_preset", "config_from_yaml",
           "convert_compvis", "convert_compvis_state_dict", "detect_first_stage", "detect_preset", "ema_key",
           "first_stage_torch_module", "unet_torch_module"]
