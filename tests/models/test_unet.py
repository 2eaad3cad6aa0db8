"""DDPMUNet: architecture facts, config validation, call convention, registry and save/load.

Numerical agreement with PyTorch is tested in tests/models/convert/test_convert_ddpm.py (diffusers reference).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msfp_jax.checkpoint import CheckpointError
from msfp_jax.models import (PRESETS, DDPMUNet, DDPMUNetConfig, InvalidModelConfigError, UnknownArchitectureError,
                             abstract_params, build_model, load, load_extra_tree, registry, save_converted)
from msfp_jax.models.attention import MatMul
from msfp_jax.models.convert import ConversionError
from msfp_jax.models.layers import timestep_embedding

# Tiny model used throughout: 2 levels, attention at the 4x4 level, 2 res blocks.
TINY = dict(resolution=8, in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=2,
            attn_resolutions=(4,), dropout=0.5)


def _random_variables(model, seed: int = 0) -> dict:
  """Random parameters of the right shapes without compiling `init` (slow for a UNet on a busy CPU)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == "kernel":
      return (rng.standard_normal(leaf.shape) / math.sqrt(math.prod(leaf.shape[:-1]))).astype(np.float32)
    return (0.3 * rng.standard_normal(leaf.shape) + (path[-1].key == "scale")).astype(np.float32)

  return {"params": jax.tree_util.tree_map_with_path(draw, abstract_params(model))}


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, expected", [("cifar10", 35_746_307), ("celeba", 78_700_803)])
def test_public_configurations_have_published_parameter_counts(name, expected):
  model, _ = build_model("ddpm_unet", PRESETS[name].to_dict())
  assert _count(abstract_params(model)) == expected


def test_module_names_follow_pytorch_diffusion_layout():
  params = abstract_params(DDPMUNet(config=PRESETS["cifar10"]))
  expected = {"temb_dense_0", "temb_dense_1", "conv_in", "mid_block_1", "mid_attn_1", "mid_block_2", "norm_out",
              "conv_out"}
  for i in range(4):
    expected |= {f"down_{i}_block_{j}" for j in range(2)} | {f"up_{i}_block_{j}" for j in range(3)}
    if i == 1:  # 16x16
      expected |= {f"down_1_attn_{j}" for j in range(2)} | {f"up_1_attn_{j}" for j in range(3)}
    if i != 3:
      expected.add(f"down_{i}_downsample")
    if i != 0:
      expected.add(f"up_{i}_upsample")
  assert set(params) == expected
  assert set(params["down_1_block_0"]) == {"norm1", "conv1", "temb_proj", "norm2", "conv2", "nin_shortcut"}
  assert set(params["down_1_attn_0"]) == {"norm", "q", "k", "v", "proj_out"}
  assert set(params["down_0_downsample"]) == {"conv"}
  assert params["down_0_downsample"]["conv"]["kernel"].shape == (3, 3, 128, 128)


def test_every_linear_map_and_attention_product_is_an_interceptable_module():
  model = DDPMUNet(config=DDPMUNetConfig(**TINY))
  x, t = model.example_inputs(2)
  # Traced abstractly (eval_shape): interception happens at trace time, nothing needs compiling.
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
  calls = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      calls.append((type(context.module).__name__, "/".join(context.module.path)))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.apply, variables, x, t)
  matmuls = sorted(path for kind, path in calls if kind == "MatMul")
  attn = ["down_1_attn_0", "down_1_attn_1", "mid_attn_1", "up_1_attn_0", "up_1_attn_1", "up_1_attn_2"]
  assert matmuls == sorted(f"{a}/{m}" for a in attn for m in ("qk_matmul", "av_matmul"))
  # Every parameter belongs to a Conv, Dense or GroupNorm that was called as a module.
  owners = {path: kind for kind, path in calls}
  for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"]):
    module_path = "/".join(p.key for p in path[:-1])
    assert owners[module_path] in ("Conv", "Dense", "GroupNorm"), module_path


def test_timestep_embedding_matches_ddpm_formula_in_float64():
  t = np.array([0, 1, 17, 999])
  dim = 10
  half = dim // 2
  freqs = np.exp(-math.log(10000) * np.arange(half) / (half - 1))
  expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
  np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), dim), expected, atol=2e-4)
  flipped = timestep_embedding(jnp.asarray(t), dim + 1, flip_sin_to_cos=True, freq_shift=0)
  freqs0 = np.exp(-math.log(10000) * np.arange(half) / half)
  expected0 = np.concatenate([np.cos(t[:, None] * freqs0), np.sin(t[:, None] * freqs0), np.zeros((4, 1))], axis=1)
  np.testing.assert_allclose(flipped, expected0, atol=2e-4)


@pytest.fixture(scope="module")
def tiny():
  model = DDPMUNet(config=DDPMUNetConfig(**TINY))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32)
  t = jnp.array([5, 700], jnp.int32)
  return model, _random_variables(model), x, t


def test_dropout_only_in_training(tiny):
  model, variables, x, t = tiny
  apply = jax.jit(model.apply, static_argnames="train")
  a = apply(variables, x, t)
  np.testing.assert_array_equal(a, apply(variables, x, t))  # no rng needed, deterministic
  d1 = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(1)})
  d2 = apply(variables, x, t, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(d1, a) and not np.allclose(d1, d2)
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, x, t, train=True)


def test_class_conditional_model_uses_labels():
  config = DDPMUNetConfig(**{**TINY, "attn_resolutions": (), "num_res_blocks": 1, "num_classes": 3})
  model = DDPMUNet(config=config)
  x, t, y = model.example_inputs(2)
  variables = _random_variables(model)
  assert variables["params"]["label_emb"]["embedding"].shape == (3, 128)
  x = x + 1.0
  apply = jax.jit(model.apply)
  out0 = apply(variables, x, t, jnp.array([0, 0]))
  out1 = apply(variables, x, t, jnp.array([1, 2]))
  assert not np.allclose(out0, out1)
  with pytest.raises(ValueError, match="class-conditional"):
    model.apply(variables, x, t)


def test_bad_inputs_are_named(tiny):
  model, variables, x, t = tiny
  with pytest.raises(ValueError, match=r"x of shape \[batch, 8, 8, 3\]"):
    model.apply(variables, jnp.zeros((2, 3, 8, 8)), t)
  with pytest.raises(ValueError, match="one timestep per example"):
    model.apply(variables, x, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="unconditional"):
    model.apply(variables, x, t, jnp.zeros((2,), jnp.int32))


@pytest.mark.parametrize("change, message", [
    ({"attn_resolutions": (16,)}, r"attn_resolutions \[16\] never occur.*\[8, 4\]"),
    ({"ch_mult": ()}, "ch_mult is empty"),
    ({"ch": 48}, r"channel counts \[48\] \(ch=48 times ch_mult\).*32 GroupNorm groups"),
    ({"resolution": 9}, "not divisible by 2\\*\\*1"),
    ({"num_res_blocks": 0}, "num_res_blocks must be a positive integer"),
    ({"dropout": 1.0}, "dropout must be in"),
])
def test_impossible_configs_are_refused(change, message):
  with pytest.raises(InvalidModelConfigError, match=message):
    DDPMUNetConfig(**{**TINY, **change})


def test_registry_builds_from_json_style_dicts_and_rejects_unknowns():
  model, config = build_model("ddpm_unet", {**TINY, "ch_mult": [1, 2], "attn_resolutions": [4]})
  assert isinstance(model, DDPMUNet) and config == DDPMUNetConfig(**TINY)
  with pytest.raises(ValueError, match=r"Unknown DDPMUNetConfig keys \['chanels'\]"):
    build_model("ddpm_unet", {"chanels": 3})
  with pytest.raises(UnknownArchitectureError, match="registered architectures"):
    build_model("resnet50", {})
  assert {"ddpm_unet", "ldm_unet", "vq_f4", "kl_f8"} <= set(registry())
  assert registry()["kl_f8"].module == "msfp_jax.models.autoencoder"


def test_save_converted_and_load_round_trip(tiny, tmp_path):
  model, variables, x, t = tiny
  extra = {"codebook": np.arange(6, dtype=np.float32).reshape(2, 3)}
  save_converted(tmp_path / "m", "ddpm_unet", model.config.to_dict(), variables["params"], extra_trees=extra,
                 extra_config={"source": {"format": "test"}})
  loaded_model, loaded_vars, meta = load(tmp_path / "m")
  assert loaded_model.config == model.config
  assert meta["architecture"] == "ddpm_unet" and meta["source"] == {"format": "test"}
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply(loaded_vars, x, t), apply(variables, x, t))
  np.testing.assert_array_equal(load_extra_tree(tmp_path / "m", "codebook"), extra["codebook"])


def test_save_converted_refuses_params_of_another_shape(tiny, tmp_path):
  model, variables, _, _ = tiny
  params = jax.tree.map(np.asarray, variables["params"])
  params["conv_out"]["kernel"] = np.zeros((3, 3, 32, 4), np.float32)
  del params["norm_out"]
  with pytest.raises(ConversionError, match=r"missing \(2\): norm_out/bias, norm_out/scale.*conv_out/kernel"):
    save_converted(tmp_path / "m", "ddpm_unet", model.config.to_dict(), params)
  assert not (tmp_path / "m" / "model_config.json").exists()


def test_load_refuses_missing_or_foreign_directories(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m msfp_jax.convert"):
    load(tmp_path / "absent")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "model_config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="'architecture'"):
    load(tmp_path / "other")
  (tmp_path / "other" / "model_config.json").write_text(
      '{"architecture": "ddpm_unet", "config": {"resolution": 8, "ch": 32, "ch_mult": [1, 2], '
      '"attn_resolutions": [4]}}')
  with pytest.raises(CheckpointError, match="No checkpoint"):
    load(tmp_path / "other")
