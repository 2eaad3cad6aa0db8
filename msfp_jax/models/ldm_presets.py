"""Built-in configurations of the three public CompVis latent-diffusion checkpoints.

They transcribe the CompVis YAML files (configs/latent-diffusion/cin256-v2.yaml,
lsun_bedrooms-ldm-vq-4.yaml, lsun_churches-ldm-kl-8.yaml and the first-stage configs they point to),
so that `convert_compvis(ckpt, dst, preset=...)` works without the YAML. Published sizes (LDM paper,
Rombach et al. 2022, table 14/15): 400M, 274M and 294M parameters for the diffusion model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from msfp_jax.models.autoencoder import AutoencoderConfig
from msfp_jax.models.ldm_unet import LDMUNetConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class LDMPreset:
  """Everything a CompVis LDM checkpoint needs besides its weights.

  Attributes:
    name: preset id.
    unet: the diffusion model.
    first_stage_architecture: "vq_f4" or "kl_f8".
    first_stage: the autoencoder.
    scale_factor: latents are multiplied by it after encoding (divided before decoding).
    scale_by_std: the model fitted scale_factor to its data and stores it in the checkpoint
      (`scale_factor` buffer); the converter then requires and uses that value.
    num_classes: real classes of a class-conditional model (the table has one more row: the null class).
    null_class: the label of the unconditional branch of classifier-free guidance, or None.
    linear_start, linear_end, timesteps: the CompVis "linear" schedule (sqrt(beta) evenly spaced;
      msfp_jax.diffusion calls it "scaled_linear").
    published_params: the UNet's parameter count as published (millions), for reference.
  """
  name: str
  unet: LDMUNetConfig
  first_stage_architecture: str
  first_stage: AutoencoderConfig
  scale_factor: float = 1.0
  num_classes: int | None = None
  null_class: int | None = None
  linear_start: float = 0.0015
  linear_end: float = 0.0195
  timesteps: int = 1000
  scale_by_std: bool = False
  published_params: float | None = None

  @property
  def conditioning(self) -> dict[str, Any]:
    if self.num_classes is None:
      return {"kind": "none"}
    return {"kind": "class", "num_classes": self.num_classes, "null_class": self.null_class}

  @property
  def schedule(self) -> dict[str, Any]:
    return {"kind": "scaled_linear", "beta_start": self.linear_start, "beta_end": self.linear_end,
            "num_timesteps": self.timesteps}


VQ_F4 = AutoencoderConfig(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, attn_resolutions=(),
                          resolution=256, in_channels=3, out_ch=3, z_channels=3, double_z=False,
                          embed_dim=3, n_embed=8192)
KL_F8 = AutoencoderConfig(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(),
                          resolution=256, in_channels=3, out_ch=3, z_channels=4, double_z=True,
                          embed_dim=4)

PRESETS: dict[str, LDMPreset] = {
    "cin256-v2": LDMPreset(
        name="cin256-v2",
        unet=LDMUNetConfig(in_channels=3, out_channels=3, model_channels=192, channel_mult=(1, 2, 3, 5),
                           num_res_blocks=2, attention_resolutions=(8, 4, 2), num_heads=1,
                           use_spatial_transformer=True, transformer_depth=1, context_dim=512,
                           context_classes=1001, image_size=64),
        first_stage_architecture="vq_f4", first_stage=VQ_F4, scale_factor=1.0,
        num_classes=1000, null_class=1000, linear_start=0.0015, linear_end=0.0195,
        published_params=400.0),
    "lsun_bedrooms": LDMPreset(
        name="lsun_bedrooms",
        unet=LDMUNetConfig(in_channels=3, out_channels=3, model_channels=224, channel_mult=(1, 2, 3, 4),
                           num_res_blocks=2, attention_resolutions=(8, 4, 2), num_head_channels=32,
                           image_size=64),
        first_stage_architecture="vq_f4", first_stage=VQ_F4, scale_factor=1.0,
        linear_start=0.0015, linear_end=0.0195, published_params=274.0),
    "lsun_churches": LDMPreset(
        name="lsun_churches",
        unet=LDMUNetConfig(in_channels=4, out_channels=4, model_channels=192, channel_mult=(1, 2, 2, 4, 4),
                           num_res_blocks=2, attention_resolutions=(1, 2, 4, 8), num_heads=8,
                           use_scale_shift_norm=True, resblock_updown=True, image_size=32),
        first_stage_architecture="kl_f8", first_stage=KL_F8, scale_factor=1.0,
        linear_start=0.0015, linear_end=0.0155, scale_by_std=True, published_params=294.0),
}
# Friendly aliases (the names users know the checkpoints by).
ALIASES = {"ldm4-imagenet": "cin256-v2", "imagenet": "cin256-v2", "cin256": "cin256-v2",
           "ldm4-bedroom": "lsun_bedrooms", "bedroom": "lsun_bedrooms",
           "ldm8-church": "lsun_churches", "church": "lsun_churches"}


def get_preset(name: str) -> LDMPreset:
  """A preset by name or alias (see PRESETS and ALIASES)."""
  key = ALIASES.get(name, name)
  if key not in PRESETS:
    raise ValueError(f"unknown LDM preset {name!r}; choose one of {sorted(PRESETS)} "
                     f"(aliases: {sorted(ALIASES)}).")
  return PRESETS[key]
