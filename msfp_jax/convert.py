"""Convert a public diffusion checkpoint into a msfp_jax model directory.

  python -m msfp_jax.convert SRC DST [--config model.yaml] [--preset NAME] [--resolution N] [--no-ema]

SRC is detected as one of:
  * a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors/.bin), or a pipeline
    folder with such a unet/ subfolder;
  * a pytorch_diffusion / DDIM state dict (.ckpt/.pth, EMA files, `module.` prefix);
  * the DDIM runner's list [model, optimizer, epoch, step, ema] (EMA element unless --no-ema);
  * a CompVis latent-diffusion Lightning checkpoint (`state_dict` with `model.diffusion_model.*` keys).
DST receives the parameters (orbax) and model_config.json; load it with `msfp_jax.models.load(DST)`.
No torch is needed: PyTorch files are read by msfp_jax.torch_pickle.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Mapping
from typing import Any

from msfp_jax import checkpoint
from msfp_jax.models.convert import diffusers_unet, pytorch_diffusion
from msfp_jax.models.convert.common import ConversionError, read_yaml, strip_prefix
from msfp_jax.models.convert.compvis import convert_compvis
from msfp_jax.models.registry import MODEL_CONFIG_FILE
from msfp_jax.models.unet import preset as ddpm_preset
from msfp_jax.torch_pickle import load_torch_file

COMPVIS_PREFIX = "model.diffusion_model."


def _read_yaml(path: pathlib.Path) -> dict:
  data = read_yaml(path, what="Config file", syntax="YAML/JSON")
  if not isinstance(data, dict):
    raise ConversionError(f"{path} must hold a mapping (a DDIM/LDM config), got {type(data).__name__}.")
  return data


def detect_format(obj: Any) -> str:
  """'ddim_list' | 'pytorch_diffusion' | 'compvis' for a loaded PyTorch object; ConversionError otherwise."""
  if isinstance(obj, (list, tuple)):
    return "ddim_list"
  if not isinstance(obj, Mapping):
    raise ConversionError(f"Not a diffusion checkpoint: the file holds a {type(obj).__name__}, not a state dict "
                          "or the DDIM list.")
  inner = obj.get("state_dict")
  if isinstance(inner, Mapping) and any(str(k).startswith(COMPVIS_PREFIX) for k in inner):
    return "compvis"
  if any(str(k).startswith(COMPVIS_PREFIX) for k in obj):
    return "compvis"
  if pytorch_diffusion.is_pytorch_diffusion_state_dict(obj):
    return "pytorch_diffusion"
  keys = list(strip_prefix({str(k): None for k in obj}, "module."))
  if "time_embedding.linear_1.weight" in keys:
    raise ConversionError("This is a bare diffusers UNet state dict; convert the diffusers model folder "
                          "(config.json beside the weights) instead.")
  raise ConversionError(f"Not a recognised diffusion checkpoint: the mapping has keys {keys[:10]}"
                        f"{' ...' if len(keys) > 10 else ''}. Expected a pytorch_diffusion/DDIM UNet state dict "
                        "(temb.dense.0.weight, conv_in.weight, ...), the DDIM list, a CompVis checkpoint "
                        "(state_dict with model.diffusion_model.*) or a diffusers folder.")


def convert(src: str | pathlib.Path, dst: str | pathlib.Path, *, config: str | pathlib.Path | None = None,
            preset: str | None = None, resolution: int | None = None, use_ema: bool = True) -> dict:
  """Detects the format of `src`, converts it into `dst`, and returns the written model_config dict."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if not src.exists():
    raise FileNotFoundError(f"{src} does not exist.")
  if config is not None and preset is not None:
    raise ValueError("Give either --config or --preset, not both.")
  if src.is_dir():
    if (src / MODEL_CONFIG_FILE).is_file():
      raise ConversionError(f"{src} is already a converted msfp_jax model; load it with msfp_jax.models.load.")
    if config is not None or preset is not None or resolution is not None or not use_ema:
      raise ValueError("A diffusers folder carries its own config.json and one set of weights; --config, "
                       "--preset, --resolution and --no-ema do not apply.")
    diffusers_unet.convert_diffusers_unet(src, dst)
    return checkpoint.load_json(dst / MODEL_CONFIG_FILE)

  if src.suffix == ".safetensors":
    if (src.parent / "config.json").is_file():
      return convert(src.parent, dst, config=config, preset=preset, resolution=resolution, use_ema=use_ema)
    obj = diffusers_unet.read_weights_file(src)
  else:
    try:
      obj = load_torch_file(src)
    except Exception as e:  # the reader's many failure modes all mean the same thing to the user
      raise ConversionError(f"{src} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}).") from e

  kind = detect_format(obj)
  if kind == "compvis":
    if resolution is not None:
      raise ValueError("--resolution applies to pytorch_diffusion checkpoints only; LDM configs give it.")
    convert_compvis(obj, dst, config_yaml=None if config is None else str(config), preset=preset, use_ema=use_ema)
  else:
    model_config = None
    if preset is not None:
      try:
        model_config = ddpm_preset(preset)
      except ValueError as e:
        raise ConversionError(str(e)) from e
    elif config is not None:
      model_config = pytorch_diffusion.config_from_mapping(_read_yaml(pathlib.Path(config)))
    if model_config is not None and resolution is not None:
      raise ValueError("--resolution only completes an inferred config; the given config already sets it.")
    if kind == "pytorch_diffusion" and not use_ema:
      raise ValueError("--no-ema applies to the DDIM list format only; a state dict file holds one set of weights.")
    pytorch_diffusion.convert_pytorch_diffusion(obj, dst, config=model_config, resolution=resolution,
                                                use_ema=use_ema, source=str(src))
  return checkpoint.load_json(dst / MODEL_CONFIG_FILE)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m msfp_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("src", help="checkpoint file or diffusers folder")
  parser.add_argument("dst", help="output directory (params + model_config.json)")
  parser.add_argument("--config", help="model YAML (DDIM config for pytorch_diffusion files; LDM config for CompVis)")
  parser.add_argument("--preset", help="known configuration: cifar10 / celeba (DDPM), or an LDM preset name")
  parser.add_argument("--resolution", type=int, help="image resolution when it cannot be inferred (DDPM files)")
  parser.add_argument("--no-ema", dest="use_ema", action="store_false",
                      help="take the raw (non-EMA) weights from checkpoints that hold both")
  args = parser.parse_args(argv)
  try:
    meta = convert(args.src, args.dst, config=args.config, preset=args.preset, resolution=args.resolution,
                   use_ema=args.use_ema)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Converted {args.src} -> {args.dst}: architecture {meta['architecture']}, config {meta['config']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
