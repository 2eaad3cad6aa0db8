"""msfp_jax.models.convert.common: a checkpoint with NaN / Inf weights is refused, naming the tensors."""
from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from msfp_jax import convert as convert_cli
from msfp_jax.models.convert import ConversionError, convert_state_dict

EXPECTED = {"block": {"conv": {"kernel": jax.ShapeDtypeStruct((1, 1, 2, 3), np.float32),
                               "bias": jax.ShapeDtypeStruct((3,), np.float32)}},
            "out": {"kernel": jax.ShapeDtypeStruct((3, 4), np.float32)}}


def _state_dict():
  rng = np.random.default_rng(0)
  return {"block.conv.weight": rng.normal(size=(3, 2, 1, 1)).astype(np.float32),
          "block.conv.bias": rng.normal(size=3).astype(np.float32),
          "out.weight": rng.normal(size=(4, 3)).astype(np.float32)}


def _module(path):
  return ".".join(path)


def test_nonfinite_weights_are_refused_naming_the_tensors():
  params = convert_state_dict(_state_dict(), EXPECTED, _module)
  assert np.isfinite(params["out"]["kernel"]).all()
  state_dict = _state_dict()
  state_dict["block.conv.weight"][0, 1, 0, 0] = np.nan
  state_dict["out.weight"][:2, 0] = np.inf
  with pytest.raises(ConversionError) as error:
    convert_state_dict(state_dict, EXPECTED, _module, source="test checkpoint")
  message = str(error.value)
  assert "The test checkpoint holds NaN/Inf weights" in message
  assert "block.conv.weight (1 of 6 values)" in message and "out.weight (2 of 12 values)" in message
  assert "block.conv.bias" not in message and "\n" not in message


def test_cli_refuses_a_diffusers_model_with_nan_weights(helpers, tmp_path, capsys):
  model = helpers.random_diffusers_unet(
      seed=0, sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 32), layers_per_block=1,
      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
      add_attention=False, norm_num_groups=8)
  with torch.no_grad():
    model.conv_in.weight[0, 0, 0, 0] = float("nan")
  folder = tmp_path / "hf"
  model.save_pretrained(folder, safe_serialization=True)
  assert convert_cli.main([str(folder), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert "NaN/Inf weights" in err and "conv_in.weight (1 of " in err
  assert not (tmp_path / "out" / "model_config.json").exists(), "nothing may be written for a refused checkpoint"
