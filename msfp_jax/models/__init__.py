"""Flax models and their checkpoints.

`build_model(architecture, config_dict)` builds any registered architecture; `save_converted` / `load`
read and write converted-model directories (orbax params + model_config.json), `load_first_stage` the
autoencoder the CompVis converter writes beside a latent-diffusion UNet.
"""
from msfp_jax.models.ldm_unet import load_first_stage
from msfp_jax.models.registry import (
    BUILTIN_MODELS,
    ModelEntry,
    UnknownArchitectureError,
    abstract_params,
    build_model,
    load,
    load_extra_tree,
    read_model_config,
    register,
    registered_architectures,
    resolve_model_path,
    save_converted,
)
from msfp_jax.models.unet import PRESETS, DDPMUNet, DDPMUNetConfig, InvalidModelConfigError, preset

__all__ = [
    "BUILTIN_MODELS", "DDPMUNet", "DDPMUNetConfig", "InvalidModelConfigError", "ModelEntry", "PRESETS",
    "UnknownArchitectureError", "abstract_params", "build_model", "load", "load_extra_tree", "load_first_stage",
    "preset", "read_model_config", "register", "registered_architectures", "resolve_model_path", "save_converted",
]
