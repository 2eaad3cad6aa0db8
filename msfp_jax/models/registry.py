"""Architecture name -> (config dataclass, Flax module), resolved lazily from import strings.

Entries are import strings, not classes, so that model modules can be added (and can import the rest of
msfp_jax) without circular imports, and an architecture whose module is missing fails only when used.

Convention for registered models: the module class takes its config dataclass as the field `config`
(`ModelClass(config=cfg)`); the config dataclass takes the JSON config dict as keyword arguments. Optionally
the module has `example_inputs(batch_size=1) -> tuple` (used to check converted parameter shapes).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax import checkpoint
from msfp_jax.models.tree_check import raise_on_tree_mismatch


class UnknownArchitectureError(ValueError):
  """An architecture name that is not in the registry, or whose module cannot be imported."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelEntry:
  """Where to find one architecture's classes."""

  module: str  # import path, e.g. "msfp_jax.models.unet"
  config_class: str  # name of the config dataclass in `module`
  model_class: str  # name of the flax.linen.Module in `module`

  def resolve(self, architecture: str) -> tuple[type, type]:
    try:
      mod = importlib.import_module(self.module)
    except ImportError as e:
      raise UnknownArchitectureError(
          f"Architecture {architecture!r} is registered to {self.module}, which cannot be imported: {e}") from e
    try:
      return getattr(mod, self.config_class), getattr(mod, self.model_class)
    except AttributeError as e:
      raise UnknownArchitectureError(f"Architecture {architecture!r}: {e}") from e


_REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, *, module: str, config_class: str, model_class: str, overwrite: bool = False) -> None:
  """Registers an architecture by import strings (nothing is imported until it is used)."""
  if name in _REGISTRY and not overwrite and _REGISTRY[name] != ModelEntry(
      module=module, config_class=config_class, model_class=model_class):
    raise ValueError(f"Architecture {name!r} is already registered as {_REGISTRY[name]}; pass overwrite=True.")
  _REGISTRY[name] = ModelEntry(module=module, config_class=config_class, model_class=model_class)


def registered_architectures() -> dict[str, ModelEntry]:
  """A copy of the registry: architecture name -> ModelEntry."""
  return dict(_REGISTRY)


register("ddpm_unet", module="msfp_jax.models.unet", config_class="DDPMUNetConfig", model_class="DDPMUNet")
register("ldm_unet", module="msfp_jax.models.ldm_unet", config_class="LDMUNetConfig", model_class="LDMUNet")
register("vq_f4", module="msfp_jax.models.autoencoder", config_class="AutoencoderConfig",
         model_class="VQAutoencoder")
register("kl_f8", module="msfp_jax.models.autoencoder", config_class="AutoencoderConfig",
         model_class="KLAutoencoder")


def _tuples(value: Any) -> Any:
  # JSON has no tuples; frozen configs need hashable fields.
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def build_model(architecture: str, config: dict | Any) -> tuple[nn.Module, Any]:
  """Builds the registered architecture from a config dict (or config dataclass): (module, config dataclass).

  Unknown config keys are an error (a typo must not silently fall back to a default).
  """
  if architecture not in _REGISTRY:
    raise UnknownArchitectureError(
        f"Unknown architecture {architecture!r}; registered architectures: {sorted(_REGISTRY)}.")
  config_cls, model_cls = _REGISTRY[architecture].resolve(architecture)
  if isinstance(config, config_cls):
    cfg = config
  else:
    if dataclasses.is_dataclass(config):
      config = dataclasses.asdict(config)
    if not isinstance(config, dict):
      raise TypeError(f"build_model({architecture!r}, config): config must be a dict or {config_cls.__name__}, "
                      f"got {type(config).__name__}.")
    if dataclasses.is_dataclass(config_cls):
      known = {f.name for f in dataclasses.fields(config_cls)}
      unknown = sorted(set(config) - known)
      if unknown:
        raise ValueError(f"Unknown {config_cls.__name__} keys {unknown} for architecture {architecture!r}; "
                         f"known keys: {sorted(known)}.")
    cfg = config_cls(**_tuples(config))
  return model_cls(config=cfg), cfg


def abstract_params(model: nn.Module) -> Any:
  """Shapes/dtypes (ShapeDtypeStruct) of the model's 'params' collection, without allocating them.

  Needs `model.example_inputs()`. Cached per (model class, config): tracing a UNet's init takes seconds and
  a conversion needs the shapes several times. Treat the result as read-only.
  """
  if not hasattr(model, "example_inputs"):
    raise TypeError(f"{type(model).__name__} has no example_inputs(); cannot derive its parameter shapes.")
  config = getattr(model, "config", None)
  try:
    hash(config)
  except TypeError:
    return _trace_params(model)
  return _abstract_params_cached(type(model), config)


def _trace_params(model: nn.Module) -> Any:
  inputs = model.example_inputs()
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"]


@functools.lru_cache(maxsize=32)
def _abstract_params_cached(model_cls: type, config: Any) -> Any:
  return _trace_params(model_cls(config=config))


# ----------------------------------------------------------------------------------------------------------
# Converted-model directories: DST/model_config.json + DST/params (+ DST/<extra tree>), via msfp_jax.checkpoint.

MODEL_CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"

# Models trained here and shipped in the package: "builtin:NAME" -> msfp_jax/assets/<folder>.
# "builtin" alone is the digits model (the first one shipped), kept for existing configs.
BUILTIN_PREFIX = "builtin"
BUILTIN_MODELS = {"digits": "default_model", "cifar10": "cifar10_model"}


def resolve_model_path(path: str | os.PathLike) -> pathlib.Path:
  """A converted-model directory from a path or a built-in name ("builtin", "builtin:digits", "builtin:cifar10")."""
  text = os.fspath(path)
  if text == BUILTIN_PREFIX or text.startswith(BUILTIN_PREFIX + ":"):
    name = text.partition(":")[2] or "digits"
    if name not in BUILTIN_MODELS:
      raise FileNotFoundError(f"Unknown built-in model {text!r}; the package ships "
                              f"{[f'{BUILTIN_PREFIX}:{n}' for n in BUILTIN_MODELS]}.")
    return pathlib.Path(__file__).resolve().parents[1] / "assets" / BUILTIN_MODELS[name]
  return pathlib.Path(text).expanduser()
_RESERVED_KEYS = ("architecture", "config", "extra_trees", "format_version")


def save_converted(dst, architecture: str, config: dict | Any, params: Any, *,
                   extra_trees: dict[str, Any] | None = None, extra_config: dict | None = None) -> None:
  """Writes a converted model: DST/model_config.json ({"architecture", "config", **extra_config}), DST/params.

  `extra_trees` (e.g. {"first_stage_params": ...}) are saved as DST/<name>; their names are recorded under
  "extra_trees" in the JSON (read them back with `load_extra_tree`). The parameters are checked against the
  architecture's shapes first (when the model has `example_inputs`), so a directory that `load` would reject
  is never written.
  """

  model, cfg = build_model(architecture, config)
  if hasattr(model, "example_inputs"):
    raise_on_tree_mismatch(abstract_params(model), params, what=f"{architecture} parameters")
  extra_trees = dict(extra_trees or {})
  extra_config = dict(extra_config or {})
  clash = sorted(set(extra_config) & set(_RESERVED_KEYS))
  if clash:
    raise ValueError(f"extra_config keys {clash} are reserved by the model_config.json format.")
  bad_names = sorted(n for n in extra_trees if n in (PARAMS_DIR, MODEL_CONFIG_FILE) or "/" in n or not n)
  if bad_names:
    raise ValueError(f"extra_trees names {bad_names} are not allowed (reserved or not a plain folder name).")
  dst = pathlib.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  checkpoint.save_tree(dst / PARAMS_DIR, jax.tree.map(np.asarray, params))
  for name, tree in extra_trees.items():
    checkpoint.save_tree(dst / name, jax.tree.map(np.asarray, tree))
  cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else dataclasses.asdict(cfg)
  # Written last: a directory with a model_config.json is complete.
  checkpoint.save_json(dst / MODEL_CONFIG_FILE, {
      "format_version": 1, "architecture": architecture, "config": cfg_dict,
      "extra_trees": sorted(extra_trees), **extra_config})


def read_model_config(dst) -> dict:
  """The model_config.json of a converted-model directory (or built-in name), checked for its two keys."""
  dst = resolve_model_path(dst)
  if not dst.exists():
    raise FileNotFoundError(f"No converted model at {dst}. Convert a checkpoint first: "
                            f"python -m msfp_jax.convert SRC {dst}")
  if not (dst / MODEL_CONFIG_FILE).is_file():
    raise FileNotFoundError(f"{dst} is not a converted msfp_jax model: it has no {MODEL_CONFIG_FILE}. "
                            f"Convert a checkpoint with: python -m msfp_jax.convert SRC DST")
  meta = checkpoint.load_json(dst / MODEL_CONFIG_FILE)
  if not isinstance(meta, dict) or "architecture" not in meta or not isinstance(meta.get("config"), dict):
    raise ValueError(f"{dst / MODEL_CONFIG_FILE} must be a JSON object with 'architecture' (str) and "
                     f"'config' (object); got {type(meta).__name__} with keys "
                     f"{sorted(meta) if isinstance(meta, dict) else '-'}.")
  return meta


def load(dst) -> tuple[nn.Module, dict, dict]:
  """Loads a directory written by `save_converted`, or a built-in model ("builtin:cifar10"):
  (model, {"params": ...}, model_config dict).

  The parameter shapes are checked against the architecture (when the model has `example_inputs`).
  """
  meta = read_model_config(dst)
  model, _ = build_model(meta["architecture"], meta["config"])
  target = abstract_params(model) if hasattr(model, "example_inputs") else None
  params = checkpoint.load_tree(resolve_model_path(dst) / PARAMS_DIR, target)
  return model, {"params": jax.tree.map(jnp.asarray, params)}, meta


def load_extra_tree(dst, name: str) -> Any:
  """Loads one of the `extra_trees` saved beside the parameters (numpy leaves)."""
  meta = read_model_config(dst)
  if name not in meta.get("extra_trees", []):
    raise KeyError(f"{dst} has no extra tree {name!r}; it has {meta.get('extra_trees', [])}.")
  return checkpoint.load_tree(resolve_model_path(dst) / name)
