"""Converters from PyTorch / diffusers checkpoints to msfp_jax model directories (see msfp_jax.convert)."""
from msfp_jax.models.convert.common import ConversionError, convert_state_dict, raise_on_tree_mismatch
from msfp_jax.models.convert.diffusers_unet import (
                                                    convert_diffusers_state_dict,
                                                    convert_diffusers_unet,
                                                    diffusers_config_to_ddpm,
)
from msfp_jax.models.convert.pytorch_diffusion import (
                                                    convert_pytorch_diffusion,
                                                    convert_pytorch_diffusion_state_dict,
                                                    infer_config,
)

__all__ = [
    "ConversionError", "convert_diffusers_state_dict", "convert_diffusers_unet", "convert_pytorch_diffusion",
    "convert_pytorch_diffusion_state_dict", "convert_state_dict", "diffusers_config_to_ddpm", "infer_config",
    "raise_on_tree_mismatch",
]
