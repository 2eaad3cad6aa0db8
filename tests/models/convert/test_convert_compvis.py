"""CompVis latent-diffusion Lightning checkpoints -> msfp_jax, end to end.

The checkpoints are made here: diffusers' UNet2DConditionModel and VQModel with random weights, renamed into
the CompVis layout by the inverse mappings of tests/models/test_ldm_unet.py and test_autoencoder.py (which
verify with diffusers' own single-file converter that the CompVis dicts are right), plus a class table,
noise-schedule buffers, LitEma bookkeeping and Lightning metadata, written with torch.save. The converted
model must reproduce diffusers' noise prediction and decoded images (relative error <= 1e-4, float32).
"""
from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np
import pytest
import torch
import yaml

from msfp_jax import convert as convert_cli
from msfp_jax.diffusion import make_schedule
from msfp_jax.models import load
from msfp_jax.models.convert import ConversionError, compvis
from msfp_jax.models.convert.common import convert_state_dict
from msfp_jax.models.ldm_unet import init_shapes, load_first_stage

jax.config.update("jax_default_matmul_precision", "highest")

_MODELS_TESTS = pathlib.Path(__file__).resolve().parents[1]


def _sibling(name):
  # --import-mode=importlib: test modules are not importable by name; load the helpers by path.
  spec = importlib.util.spec_from_file_location(f"_ldm_helpers_{name}", _MODELS_TESTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


unet_helpers = _sibling("test_ldm_unet")
ae_helpers = _sibling("test_autoencoder")
relative_error = unet_helpers.relative_error


def _schedule_buffers(linear_start=0.0015, linear_end=0.0195, timesteps=1000):
  betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
  alphas_cumprod = np.cumprod(1 - betas)
  return {"betas": torch.tensor(betas, dtype=torch.float32),
          "alphas_cumprod": torch.tensor(alphas_cumprod, dtype=torch.float32),
          "sqrt_alphas_cumprod": torch.tensor(np.sqrt(alphas_cumprod), dtype=torch.float32),
          "logvar": torch.zeros(timesteps)}


def _lightning(state_dict):
  return {"state_dict": state_dict, "epoch": 3, "global_step": 1234, "pytorch-lightning_version": "1.4.2",
          "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}


@pytest.fixture(scope="module")
def cin_like():
  """(diffusers UNet, diffusers VQModel, CompVis state dict incl. extras, class table)."""
  unet, unet_sd, table = unet_helpers.make_cin_like(seed=0)
  vq, fs_sd = ae_helpers.make_first_stage("vq_f4", ae_helpers.VQ_CONFIG, seed=1)
  sd = {**unet_sd, **fs_sd, "cond_stage_model.embedding.weight": table, **_schedule_buffers()}
  return unet, vq, sd, table


def _write(tmp_path, obj, name="model.ckpt"):
  path = tmp_path / name
  torch.save(obj, path)
  return path


def _yaml(tmp_path, data=None, name="model.yaml"):
  path = tmp_path / name
  path.write_text(yaml.safe_dump(data or unet_helpers.CIN_LIKE_YAML))
  return path


def test_cli_converts_lightning_checkpoint_and_matches_diffusers(cin_like, tmp_path):
  unet, vq, sd, table = cin_like
  src = _write(tmp_path, _lightning(sd))
  dst = tmp_path / "converted"
  meta = convert_cli.convert(src, dst, config=_yaml(tmp_path))
  assert meta["architecture"] == "ldm_unet"
  assert meta["conditioning"] == {"kind": "class", "num_classes": 10, "null_class": 10}
  assert meta["schedule"] == {"kind": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0195,
                              "num_timesteps": 1000}
  assert meta["first_stage"]["architecture"] == "vq_f4" and meta["first_stage"]["scale_factor"] == 1.0
  assert meta["source"]["weights"] == "raw (no EMA in file)"

  model, variables, _ = load(dst)
  rng = np.random.default_rng(4)
  x = rng.standard_normal((3, 8, 8, 3)).astype(np.float32)
  t = np.array([1, 400, 998], np.int32)
  y = np.array([10, 2, 7], np.int32)  # the null class and two real ones
  eps = np.asarray(jax.jit(model.apply)(variables, x, t, y))
  with torch.no_grad():
    context = table[torch.from_numpy(y).long()][:, None, :]
    ref = unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t).long(),
               encoder_hidden_states=context).sample.numpy().transpose(0, 2, 3, 1)
  assert relative_error(eps, ref) <= 1e-4

  first_stage, fs_variables, fs_meta = load_first_stage(dst)
  z = (2 * rng.standard_normal((2, 8, 8, 3))).astype(np.float32)
  images = np.asarray(jax.jit(lambda v, a: first_stage.apply(v, a, method="decode"))(fs_variables, z))
  with torch.no_grad():
    ref_images = vq.decode(torch.from_numpy(z.transpose(0, 3, 1, 2).copy())).sample.numpy().transpose(0, 2, 3, 1)
  assert relative_error(images, ref_images) <= 1e-4
  assert fs_meta["scale_factor"] == 1.0


def _ema_copy(sd, shift=0.5):
  ema = {compvis.ema_key(k): v + shift for k, v in sd.items() if k.startswith("model.diffusion_model.")}
  return {**sd, **ema, "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)}


def _expected_params(sd, cfg):
  return convert_state_dict({k: np.asarray(v) for k, v in sd.items()}, init_shapes(cfg)["params"],
                            compvis.unet_torch_module)


def _assert_same_tree(a, b):
  fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (path, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_ema_weights_are_chosen_unless_told_otherwise(cin_like, tmp_path):
  _, _, sd, _ = cin_like
  config = compvis.config_from_yaml(unet_helpers.CIN_LIKE_YAML)
  network = {k: v for k, v in sd.items() if k.startswith(("model.diffusion_model.", "cond_stage_model."))}
  shifted = {k: (v + 0.5 if k.startswith("model.diffusion_model.") else v) for k, v in network.items()}
  # Through the file reader too: the dot-less EMA names must survive torch.save / load_torch_file.
  from msfp_jax.torch_pickle import load_torch_file
  obj = load_torch_file(_write(tmp_path, _lightning(_ema_copy(sd))))
  state_dict = compvis.compvis_state_dict(obj)
  assert "model_ema.diffusion_modelinput_blocks00weight" in state_dict

  ema_params, _, info = compvis.convert_compvis_state_dict(state_dict, config)
  assert info["weights"] == "ema"
  _assert_same_tree(ema_params, _expected_params(shifted, config.unet))
  raw_params, _, info = compvis.convert_compvis_state_dict(state_dict, config, use_ema=False)
  assert info["weights"] == "raw"
  _assert_same_tree(raw_params, _expected_params(network, config.unet))


def test_non_ema_request_on_ema_only_file_is_an_error(cin_like):
  _, _, sd, _ = cin_like
  ema_only = {k: v for k, v in _ema_copy(sd).items() if not k.startswith("model.diffusion_model.")}
  config = compvis.config_from_yaml(unet_helpers.CIN_LIKE_YAML)
  with pytest.raises(ConversionError, match="only the EMA copy"):
    compvis.convert_compvis_state_dict(ema_only, config, use_ema=False)
  params, _, info = compvis.convert_compvis_state_dict(ema_only, config)  # the EMA copy alone converts
  assert info["weights"] == "ema"
  # An incomplete EMA copy names the missing weight.
  broken = dict(ema_only)
  del broken[compvis.ema_key("model.diffusion_model.out.2.weight")]
  with pytest.raises(ConversionError, match=r"model\.diffusion_model\.out\.2\.weight.*EMA copy"):
    compvis.convert_compvis_state_dict(broken, config)


def test_wrong_first_stage_for_preset_is_an_error(cin_like, tmp_path):
  _, _, sd, _ = cin_like
  src = _write(tmp_path, _lightning(sd))
  with pytest.raises(ConversionError, match="Wrong first stage.*expects a kl_f8.*VQ autoencoder"):
    convert_cli.convert(src, tmp_path / "out", preset="lsun_churches")
  assert convert_cli.main([str(src), str(tmp_path / "out2"), "--preset", "church"]) == 2
  assert not (tmp_path / "out").exists()


def test_preset_mismatch_names_the_key(cin_like):
  _, _, sd, _ = cin_like
  with pytest.raises(ConversionError, match=r"mis-shaped keys.*model\.diffusion_model\.input_blocks\.0\.0\.weight"):
    compvis.convert_compvis_state_dict(sd, compvis.config_from_preset("cin256-v2"))


def test_missing_unexpected_misshaped_and_yaml_mismatch_are_named(cin_like):
  _, _, sd, _ = cin_like
  config = compvis.config_from_yaml(unet_helpers.CIN_LIKE_YAML)
  broken = dict(sd)
  del broken["model.diffusion_model.middle_block.1.proj_in.weight"]
  broken["model.diffusion_model.out.2.bias"] = torch.zeros(4)
  broken["first_stage_model.decoder.extra.weight"] = torch.zeros(1)
  broken["first_stage_model.loss.discriminator.weight"] = torch.zeros(1)  # training loss: ignored
  with pytest.raises(ConversionError) as info:
    compvis.convert_compvis_state_dict(broken, config)
  message = str(info.value)
  assert "missing keys (1): model.diffusion_model.middle_block.1.proj_in.weight" in message
  assert "model.diffusion_model.out.2.bias (4,)" in message
  # The UNet is fine again: the first stage's unexpected weight is named.
  broken = {**sd, "first_stage_model.decoder.extra.weight": torch.zeros(1),
            "first_stage_model.loss.discriminator.weight": torch.zeros(1)}
  with pytest.raises(ConversionError, match=r"unexpected keys \(1\): first_stage_model\.decoder\.extra\.weight"):
    compvis.convert_compvis_state_dict(broken, config)

  data = yaml.safe_load(yaml.safe_dump(unet_helpers.CIN_LIKE_YAML))
  data["model"]["params"]["unet_config"]["params"]["transformer_depth"] = 2
  with pytest.raises(ConversionError, match=r"missing keys.*transformer_blocks\.1"):
    compvis.convert_compvis_state_dict(sd, compvis.config_from_yaml(data))
  data["model"]["params"]["linear_end"] = 0.012
  data["model"]["params"]["unet_config"]["params"]["transformer_depth"] = 1
  with pytest.raises(ConversionError, match="'betas'"):
    compvis.convert_compvis_state_dict(sd, compvis.config_from_yaml(data))


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "cosine"])
def test_the_betas_check_uses_the_schedules_the_sampler_uses(kind):
  # The converter checks a checkpoint's betas with CompVis' formula (the models package knows nothing of
  # msfp_jax.diffusion); the converted model is sampled with diffusion's make_schedule: they must agree.
  schedule = {"kind": kind, "beta_start": 0.0015, "beta_end": 0.0195, "num_timesteps": 1000}
  np.testing.assert_allclose(compvis.compvis_betas(schedule), make_schedule(**schedule).betas, rtol=1e-12)


def test_yaml_parsing_errors_name_the_key():
  data = yaml.safe_load(yaml.safe_dump(unet_helpers.CIN_LIKE_YAML))
  data["model"]["params"]["unet_config"]["params"]["use_fancy_attention"] = True
  with pytest.raises(ConversionError, match="unet_config.params.use_fancy_attention"):
    compvis.config_from_yaml(data)
  data = yaml.safe_load(yaml.safe_dump(unet_helpers.CIN_LIKE_YAML))
  data["model"]["params"]["parameterization"] = "x0"
  with pytest.raises(ConversionError, match="parameterization"):
    compvis.config_from_yaml(data)
  data = yaml.safe_load(yaml.safe_dump(unet_helpers.CIN_LIKE_YAML))
  data["model"]["params"]["cond_stage_config"]["params"]["embed_dim"] = 32
  with pytest.raises(ConversionError, match="context_dim"):
    compvis.config_from_yaml(data)
  with pytest.raises(FileNotFoundError):
    compvis.config_from_yaml("/nonexistent/model.yaml")


def test_kl_first_stage_takes_scale_factor_buffer():
  cfg = unet_helpers.ATTENTION_BLOCK_CONFIGS["church_like"]
  unet_sd = unet_helpers.random_compvis_unet(cfg, seed=2)
  _, fs_sd = ae_helpers.make_first_stage("kl_f8", ae_helpers.KL_CONFIG, seed=3)
  data = {"model": {"params": {
      "linear_start": 0.0015, "linear_end": 0.0155, "timesteps": 1000, "scale_by_std": True,
      "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
          "image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1, 4],
          "num_res_blocks": 1, "channel_mult": [1, 1, 2], "num_heads": 2, "use_scale_shift_norm": True,
          "resblock_updown": True}},
      "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
          "embed_dim": 4, "monitor": "val/rec_loss", "lossconfig": {"target": "torch.nn.Identity"}, "ddconfig": {
              "double_z": True, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
              "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
      "cond_stage_config": "__is_unconditional__"}}}
  config = compvis.config_from_yaml(data)
  assert config.unet == cfg.__class__(**{**cfg.to_dict(), "image_size": 8})
  sd = {**unet_sd, **fs_sd, **_schedule_buffers(linear_end=0.0155), "scale_factor": torch.tensor(0.8)}
  sd = {k: np.asarray(v) for k, v in sd.items()}
  _, fs_params, info = compvis.convert_compvis_state_dict(sd, config)
  assert info["scale_factor"] == pytest.approx(0.8)
  assert set(fs_params) == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
  del sd["scale_factor"]
  with pytest.raises(ConversionError, match="scale_factor"):
    compvis.convert_compvis_state_dict(sd, config)


def test_presets_are_recognised_from_weight_shapes():
  def fake(model_channels, in_channels, first_stage, classes):
    sd = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros((model_channels, in_channels, 3, 3))}
    sd["first_stage_model.quant_conv.weight"] = np.zeros((8 if first_stage == "kl" else 3, 1, 1, 1))
    if first_stage == "vq":
      sd["first_stage_model.quantize.embedding.weight"] = np.zeros((8192, 3))
    if classes:
      sd["cond_stage_model.embedding.weight"] = np.zeros((1001, 512))
    return sd
  assert compvis.detect_preset(fake(192, 3, "vq", True)) == "cin256-v2"
  assert compvis.detect_preset(fake(224, 3, "vq", False)) == "lsun_bedrooms"
  assert compvis.detect_preset(fake(192, 4, "kl", False)) == "lsun_churches"
  with pytest.raises(ConversionError, match="--config"):
    compvis.detect_preset(fake(64, 3, "vq", False))
