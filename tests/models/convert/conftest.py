"""Helpers for converter tests: diffusers UNet2DModels with random weights, and an independent renaming of
their state dicts into the pytorch_diffusion layout. Tests get them through the `helpers` fixture (with
--import-mode=importlib a conftest cannot be imported by name)."""
from __future__ import annotations

import pathlib
import re
import sys
import types

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from reference_helpers import randomize_  # noqa: E402

torch.set_default_dtype(torch.float32)


def random_diffusers_unet(seed: int = 0, **config):
  """A diffusers UNet2DModel whose every parameter (zero-initialised ones included) is random normal
  (`reference_helpers.randomize_`)."""
  from diffusers import UNet2DModel
  torch.manual_seed(seed)
  model = UNet2DModel(**config).eval()
  randomize_(model, seed + 1)
  return model


def torch_eps(model, x_nhwc: np.ndarray, t: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
  """The diffusers model's output for NHWC numpy inputs, as NHWC numpy."""
  with torch.no_grad():
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    kwargs = {} if y is None else {"class_labels": torch.from_numpy(y).long()}
    out = model(x, torch.from_numpy(t).long(), **kwargs).sample
  return out.numpy().transpose(0, 2, 3, 1)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) /
               np.linalg.norm(np.asarray(b, np.float64)))


def diffusers_to_pytorch_diffusion(state_dict: dict, num_levels: int) -> dict:
  """Renames a UNet2DModel state dict into pytorch_diffusion's layout (written independently of the
  converter: plain string rules on the diffusers names). Attention Linears become 1x1 conv weights."""
  out = {}
  for key, value in state_dict.items():
    k = key
    k = k.replace("time_embedding.linear_1.", "temb.dense.0.").replace("time_embedding.linear_2.", "temb.dense.1.")
    k = k.replace("conv_norm_out.", "norm_out.")
    k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
    k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
    k = re.sub(r"^down_blocks\.(\d+)\.", r"down.\1.", k)
    k = re.sub(r"^up_blocks\.(\d+)\.", lambda m: f"up.{num_levels - 1 - int(m[1])}.", k)
    k = k.replace(".resnets.", ".block.").replace(".attentions.", ".attn.")
    k = k.replace(".downsamplers.0.conv.", ".downsample.conv.").replace(".upsamplers.0.conv.", ".upsample.conv.")
    k = k.replace(".time_emb_proj.", ".temb_proj.").replace(".conv_shortcut.", ".nin_shortcut.")
    k = k.replace(".group_norm.", ".norm.").replace(".to_q.", ".q.").replace(".to_k.", ".k.")
    k = k.replace(".to_v.", ".v.").replace(".to_out.0.", ".proj_out.")
    v = value.detach().clone()
    if re.search(r"\.(q|k|v|proj_out)\.weight$", k):
      v = v[:, :, None, None]  # pytorch_diffusion's attention projections are 1x1 Conv2d
    out[k] = v
  return out


def diffusers_to_legacy_attention_names(state_dict: dict) -> dict:
  """to_q/to_k/to_v/to_out.0 -> query/key/value/proj_attn (diffusers files written before 0.15)."""
  rules = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
  out = {}
  for key, value in state_dict.items():
    for new, old in rules.items():
      key = key.replace(new, old)
    out[key] = value
  return out


@pytest.fixture(scope="session")
def helpers():
  return types.SimpleNamespace(
      random_diffusers_unet=random_diffusers_unet, torch_eps=torch_eps, relative_error=relative_error,
      diffusers_to_pytorch_diffusion=diffusers_to_pytorch_diffusion,
      diffusers_to_legacy_attention_names=diffusers_to_legacy_attention_names)
