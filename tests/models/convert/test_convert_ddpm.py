"""Converters for DDPM UNets: diffusers UNet2DModel folders, pytorch_diffusion state dicts, DDIM lists.

Reference: diffusers' UNet2DModel in PyTorch with random weights made here; the converted Flax model must
reproduce its output to 1e-4 relative error (float32). The pytorch_diffusion files are the same weights
renamed by an independent mapping (conftest), so they must convert to exactly the same parameters.
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import yaml

from msfp_jax import convert as convert_cli
from msfp_jax.checkpoint import CheckpointError
from msfp_jax.models import load
from msfp_jax.models.convert import ConversionError

jax.config.update("jax_default_matmul_precision", "highest")

COMMON = dict(time_embedding_type="positional", act_fn="silu", attention_head_dim=None,
              resnet_time_scale_shift="default", mid_block_scale_factor=1)
DDPM_STYLE = dict(freq_shift=1, flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6)

CONFIGS = {
    # No attention anywhere (mid-block attention off too).
    "no_attention": dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                         layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False, **DDPM_STYLE, **COMMON),
    # CIFAR-10's structure (2 res blocks, attention at 16x16 of 32 -> here 8x8 of 16) with tiny channels.
    "cifar_like": dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 32, 64),
                       layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), dropout=0.1, **DDPM_STYLE,
                       **COMMON),
    # diffusers' own defaults (cos-first embedding, freq_shift 0, symmetric downsample padding, eps 1e-5),
    # other channel counts and group count, attention at full resolution, class-conditional.
    "diffusers_defaults_conditional": dict(
        sample_size=8, in_channels=1, out_channels=2, block_out_channels=(32, 96), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=16, num_class_embeds=5, **COMMON),
    # Multi-head attention as diffusers' unconditional training example builds it (attention_head_dim=8, the
    # UNet2DModel default: channels per head): 2 heads at width 16, 4 at width 32 and in the middle block.
    "multi_head_dim8": dict(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=8, **{**COMMON, "attention_head_dim": 8}),
    # attention_head_dim equal to the width of every attention layer: one head, the DDPM layout.
    "single_head_explicit": dict(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, **DDPM_STYLE, **{**COMMON, "attention_head_dim": 32}),
}
# DDPMUNetConfig.attn_head_channels each converts to (None: single-head).
HEAD_CHANNELS = {"multi_head_dim8": 8}


def _inputs(name: str, config: dict):
  rng = np.random.default_rng(abs(hash(name)) % 2 ** 32)
  size = config["sample_size"]
  x = rng.standard_normal((2, size, size, config["in_channels"])).astype(np.float32)
  t = np.array([3, 917], np.int32)
  y = np.array([1, 4], np.int32) if config.get("num_class_embeds") else None
  return x, t, y


def _flax_eps(dst, x, t, y=None):
  model, variables, meta = load(dst)
  args = (x, t) if y is None else (x, t, y)
  return np.asarray(jax.jit(model.apply)(variables, *args)), variables, meta


def _assert_same_params(a, b):
  flat_a = dict(jax.tree_util.tree_leaves_with_path(a))
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=str(key))


@pytest.fixture(scope="module")
def diffusers_models(helpers):
  return {name: helpers.random_diffusers_unet(seed=i, **cfg) for i, (name, cfg) in enumerate(CONFIGS.items())}


@pytest.fixture(scope="module")
def cifar_like_converted(diffusers_models, tmp_path_factory):
  """The cifar_like model saved as a safetensors folder and converted: (dst, variables)."""
  folder = tmp_path_factory.mktemp("cifar_like_hf")
  diffusers_models["cifar_like"].save_pretrained(folder, safe_serialization=True)
  dst = tmp_path_factory.mktemp("cifar_like_jax")
  convert_cli.convert(folder, dst)
  return dst, load(dst)[1]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_folder_matches_pytorch(name, diffusers_models, helpers, tmp_path, cifar_like_converted):
  config = CONFIGS[name]
  torch_model = diffusers_models[name]
  x, t, y = _inputs(name, config)
  if name == "cifar_like":
    dst = cifar_like_converted[0]
  else:
    folder = tmp_path / "hf"
    torch_model.save_pretrained(folder, safe_serialization=True)
    dst = tmp_path / "jax"
    meta = convert_cli.convert(folder, dst)
    assert meta["architecture"] == "ddpm_unet"
  eps, _, meta = _flax_eps(dst, x, t, y)
  expected = helpers.torch_eps(torch_model, x, t, y)
  assert eps.shape == expected.shape
  assert helpers.relative_error(eps, expected) <= 1e-4
  assert meta["config"]["resolution"] == config["sample_size"]
  assert meta["config"]["attn_head_channels"] == HEAD_CHANNELS.get(name)


def test_multi_head_model_has_several_heads_in_diffusers(diffusers_models):
  # The reference really is multi-head (heads = width // attention_head_dim), so the parity above tests heads.
  model = diffusers_models["multi_head_dim8"]
  assert [a.heads for a in model.down_blocks[0].attentions] == [2]
  assert [a.heads for a in model.down_blocks[1].attentions] == [4]
  assert model.mid_block.attentions[0].heads == 4
  assert diffusers_models["single_head_explicit"].mid_block.attentions[0].heads == 1


def test_missing_attention_head_dim_means_diffusers_default_8(diffusers_models, tmp_path):
  """A config.json without attention_head_dim is UNet2DModel's default (8 channels per head), not single-head."""
  from diffusers import UNet2DModel
  folder = tmp_path / "hf"
  diffusers_models["multi_head_dim8"].save_pretrained(folder)
  config = json.loads((folder / "config.json").read_text())
  del config["attention_head_dim"]
  (folder / "config.json").write_text(json.dumps(config))
  assert UNet2DModel.from_config(UNet2DModel.load_config(folder)).config.attention_head_dim == 8
  meta = convert_cli.convert(folder, tmp_path / "jax")
  assert meta["config"]["attn_head_channels"] == 8


def test_diffusers_bin_weights_convert_to_same_params(diffusers_models, cifar_like_converted, tmp_path):
  folder = tmp_path / "hf_bin"
  diffusers_models["cifar_like"].save_pretrained(folder, safe_serialization=False)
  assert (folder / "diffusion_pytorch_model.bin").is_file()
  convert_cli.convert(folder, tmp_path / "jax")
  _assert_same_params(load(tmp_path / "jax")[1], cifar_like_converted[1])


def test_diffusers_legacy_attention_names(diffusers_models, cifar_like_converted, helpers, tmp_path):
  from safetensors.torch import save_file
  model = diffusers_models["cifar_like"]
  folder = tmp_path / "hf_old"
  model.save_pretrained(folder, safe_serialization=True)
  old = helpers.diffusers_to_legacy_attention_names(model.state_dict())
  assert any(".query." in k for k in old) and not any(".to_q." in k for k in old)
  save_file({k: v.contiguous() for k, v in old.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
  convert_cli.convert(folder, tmp_path / "jax")
  _assert_same_params(load(tmp_path / "jax")[1], cifar_like_converted[1])


def test_diffusers_pipeline_folder_uses_unet_subfolder(diffusers_models, cifar_like_converted, tmp_path):
  (tmp_path / "pipe").mkdir()
  (tmp_path / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
  diffusers_models["cifar_like"].save_pretrained(tmp_path / "pipe" / "unet")
  convert_cli.convert(tmp_path / "pipe", tmp_path / "jax")
  _assert_same_params(load(tmp_path / "jax")[1], cifar_like_converted[1])


# ------------------------------------------------------------------------------------------------------------
# pytorch_diffusion / DDIM files: the cifar_like weights renamed by the independent mapping.

@pytest.fixture(scope="module")
def pd_state_dict(diffusers_models, helpers):
  return helpers.diffusers_to_pytorch_diffusion(diffusers_models["cifar_like"].state_dict(), num_levels=3)


def test_pytorch_diffusion_zip_matches_pytorch(pd_state_dict, diffusers_models, helpers, cifar_like_converted,
                                               tmp_path):
  path = tmp_path / "model-790000.ckpt"
  torch.save(pd_state_dict, path)
  meta = convert_cli.convert(path, tmp_path / "jax", resolution=16)
  assert meta["config"]["attn_resolutions"] == [8]
  assert meta["config"]["ch_mult"] == [1, 1, 2]
  x, t, _ = _inputs("cifar_like", CONFIGS["cifar_like"])
  eps, variables, _ = _flax_eps(tmp_path / "jax", x, t)
  assert helpers.relative_error(eps, helpers.torch_eps(diffusers_models["cifar_like"], x, t)) <= 1e-4
  _assert_same_params(variables, cifar_like_converted[1])


def test_pytorch_diffusion_legacy_format_with_module_prefix(pd_state_dict, cifar_like_converted, tmp_path):
  path = tmp_path / "ema.pth"
  torch.save({f"module.{k}": v for k, v in pd_state_dict.items()}, path, _use_new_zipfile_serialization=False)
  assert not __import__("zipfile").is_zipfile(path)
  assert convert_cli.main([str(path), str(tmp_path / "jax"), "--resolution", "16"]) == 0
  _assert_same_params(load(tmp_path / "jax")[1], cifar_like_converted[1])


def test_ddim_list_takes_ema_element_unless_told(pd_state_dict, cifar_like_converted, tmp_path):
  raw = {f"module.{k}": v + 1.0 for k, v in pd_state_dict.items()}  # distinguishable from the EMA weights
  ema = {f"module.{k}": v for k, v in pd_state_dict.items()}
  optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))])
  path = tmp_path / "ckpt.pth"
  torch.save([raw, optimizer.state_dict(), 7, 1234, ema], path)
  convert_cli.convert(path, tmp_path / "ema", resolution=16)
  _assert_same_params(load(tmp_path / "ema")[1], cifar_like_converted[1])
  convert_cli.convert(path, tmp_path / "raw", resolution=16, use_ema=False)
  raw_params = load(tmp_path / "raw")[1]["params"]
  np.testing.assert_array_equal(np.asarray(raw_params["conv_in"]["bias"]),
                                pd_state_dict["conv_in.bias"].numpy() + 1.0)
  # Without an EMA element, the default (EMA) refuses rather than silently taking the raw weights.
  torch.save([raw, optimizer.state_dict(), 7, 1234], tmp_path / "no_ema.pth")
  with pytest.raises(ConversionError, match="no EMA"):
    convert_cli.convert(tmp_path / "no_ema.pth", tmp_path / "x", resolution=16)


def test_ddim_yaml_config(pd_state_dict, cifar_like_converted, tmp_path):
  path = tmp_path / "model.ckpt"
  torch.save(pd_state_dict, path)
  ddim_yaml = {"data": {"image_size": 16, "channels": 3},
               "model": {"type": "simple", "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 2],
                         "num_res_blocks": 2, "attn_resolutions": [8], "dropout": 0.1, "resamp_with_conv": True,
                         "ema": True}}
  (tmp_path / "cifar10.yml").write_text(yaml.safe_dump(ddim_yaml))
  meta = convert_cli.convert(path, tmp_path / "jax", config=tmp_path / "cifar10.yml")
  assert meta["config"]["dropout"] == 0.1 and meta["config"]["resolution"] == 16
  _assert_same_params(load(tmp_path / "jax")[1], cifar_like_converted[1])


# ------------------------------------------------------------------------------------------------------------
# Bad input: one clear error each.

def test_not_a_checkpoint(tmp_path):
  path = tmp_path / "notes.ckpt"
  path.write_text("these are not weights")
  with pytest.raises(ConversionError, match="not a readable PyTorch checkpoint"):
    convert_cli.convert(path, tmp_path / "out")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert_cli.convert(tmp_path / "missing.ckpt", tmp_path / "out")
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(ConversionError, match="no config.json"):
    convert_cli.convert(tmp_path / "empty_dir", tmp_path / "out")


def test_cli_reports_error_without_traceback(tmp_path, capsys):
  path = tmp_path / "notes.ckpt"
  path.write_text("these are not weights")
  assert convert_cli.main([str(path), str(tmp_path / "out")]) == 2
  assert "error:" in capsys.readouterr().err


def test_other_architecture(tmp_path):
  torch.save(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).state_dict(), tmp_path / "mlp.pth")
  with pytest.raises(ConversionError, match="Not a recognised diffusion checkpoint.*0.weight"):
    convert_cli.convert(tmp_path / "mlp.pth", tmp_path / "out")
  folder = tmp_path / "cond_unet"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "sample_size": 64}))
  with pytest.raises(ConversionError, match="UNet2DConditionModel, not a UNet2DModel"):
    convert_cli.convert(folder, tmp_path / "out")


def test_missing_extra_and_misshaped_keys_are_named(pd_state_dict, tmp_path):
  broken = dict(pd_state_dict)
  del broken["down.1.attn.0.q.bias"]
  broken["down.0.block.0.extra.weight"] = torch.zeros(3)
  broken["conv_out.weight"] = torch.zeros(3, 32, 5, 5)
  torch.save(broken, tmp_path / "broken.ckpt")
  with pytest.raises(ConversionError) as info:
    convert_cli.convert(tmp_path / "broken.ckpt", tmp_path / "out", resolution=16)
  message = str(info.value)
  assert "missing keys (1): down.1.attn.0.q.bias" in message
  assert "unexpected keys (1): down.0.block.0.extra.weight" in message
  assert "mis-shaped keys (1): conv_out.weight (3, 32, 5, 5)" in message
  assert not (tmp_path / "out" / "model_config.json").exists()


def test_config_that_disagrees_with_weights_names_the_keys(pd_state_dict, tmp_path):
  torch.save(pd_state_dict, tmp_path / "model.ckpt")
  with pytest.raises(ConversionError, match=r"mis-shaped keys .*conv_in\.weight.*--config/--preset"):
    convert_cli.convert(tmp_path / "model.ckpt", tmp_path / "out", preset="cifar10")


def test_unknown_resolution_is_asked_for(pd_state_dict, tmp_path):
  torch.save(pd_state_dict, tmp_path / "model.ckpt")
  with pytest.raises(ConversionError, match="matches no preset.*--resolution"):
    convert_cli.convert(tmp_path / "model.ckpt", tmp_path / "out")
  with pytest.raises(ConversionError, match=r"resolution 2 is not divisible by 2\*\*2"):
    convert_cli.convert(tmp_path / "model.ckpt", tmp_path / "out", resolution=2)


@pytest.mark.parametrize("change, message", [
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift='scale_shift'"),
    ({"attention_head_dim": 24}, r"attention_head_dim=24 does not divide the attention widths \[32, 64\]"),
    ({"attention_head_dim": 64}, r"does not divide the attention widths \[32\]"),
    ({"block_out_channels": [32, 48, 64]}, "not multiples of the first"),
    ({"up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D"]}, "Attention is at down levels"),
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]}, "CrossAttnDownBlock2D"),
    ({"sample_size": 6}, "impossible DDPM UNet"),
])
def test_unrepresentable_diffusers_configs_are_refused(change, message, diffusers_models, tmp_path):
  folder = tmp_path / "hf"
  diffusers_models["cifar_like"].save_pretrained(folder)
  config = json.loads((folder / "config.json").read_text())
  config.update(change)
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConversionError, match=message):
    convert_cli.convert(folder, tmp_path / "out")


def test_load_errors(tmp_path, cifar_like_converted):
  with pytest.raises(FileNotFoundError, match="No converted model"):
    load(tmp_path / "nothing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no model_config.json"):
    load(tmp_path / "empty")
  # A model_config.json that describes another architecture than the saved params.
  dst = tmp_path / "swapped"
  import shutil
  shutil.copytree(cifar_like_converted[0], dst)
  meta = json.loads((dst / "model_config.json").read_text())
  meta["config"]["ch"] = 64
  (dst / "model_config.json").write_text(json.dumps(meta))
  with pytest.raises(CheckpointError, match="does not match the expected structure"):
    load(dst)


def test_google_ddpm_cifar10_config_maps_to_the_cifar10_preset():
  from msfp_jax.bench.unet import CIFAR10_DIFFUSERS_CONFIG
  from msfp_jax.models import PRESETS
  from msfp_jax.models.convert import diffusers_config_to_ddpm
  assert diffusers_config_to_ddpm({"_class_name": "UNet2DModel", **CIFAR10_DIFFUSERS_CONFIG}) == PRESETS["cifar10"]


@pytest.mark.parametrize("name", ["cifar10", "celeba"])
def test_public_architectures_are_inferred_from_weight_shapes(name):
  """The released CIFAR-10 / CelebA files need no --preset: shapes (zero-stride views, no memory) suffice."""
  from msfp_jax.models import PRESETS, DDPMUNet, abstract_params
  from msfp_jax.models.convert import infer_config
  from msfp_jax.models.convert.pytorch_diffusion import pytorch_diffusion_module_for
  state_dict = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(DDPMUNet(config=PRESETS[name]))):
    names = [p.key for p in path]
    shape = leaf.shape
    if names[-1] == "kernel":
      shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else (shape[1], shape[0], 1, 1)
    key = pytorch_diffusion_module_for(tuple(names[:-1])) + (".bias" if names[-1] == "bias" else ".weight")
    state_dict[key] = np.broadcast_to(np.float32(0), shape)
  assert infer_config(state_dict) == PRESETS[name]


def test_format_detection():
  zeros = np.zeros(2, np.float32)
  assert convert_cli.detect_format({"state_dict": {"model.diffusion_model.out.2.weight": zeros}}) == "compvis"
  assert convert_cli.detect_format({"module.temb.dense.0.weight": zeros, "module.conv_in.weight": zeros,
                                    "module.conv_out.weight": zeros}) == "pytorch_diffusion"
  assert convert_cli.detect_format([{}, {}, 1, 2]) == "ddim_list"
  with pytest.raises(ConversionError, match="bare diffusers UNet state dict.*config.json"):
    convert_cli.detect_format({"time_embedding.linear_1.weight": zeros})
  with pytest.raises(ConversionError, match="holds a str"):
    convert_cli.detect_format("weights")
