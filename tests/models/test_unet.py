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
from msfp_jax.models import (
  PRESETS,
  DDPMUNet,
  DDPMUNetConfig,
  InvalidModelConfigError,
  UnknownArchitectureError,
  abstract_params,
  build_model,
  load,
  load_extra_tree,
  registered_architectures,
  save_converted,
)
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


def _attn_reference(params, x, heads, eps):
  """Float64 numpy multi-head self-attention block (GroupNorm, per-head softmax(q k^T / sqrt(d)) v, proj, +x)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  b, hgt, wid, c = x.shape
  xg = np.asarray(x, np.float64).reshape(b, hgt * wid, 32, c // 32)
  mean = xg.mean(axis=(1, 3), keepdims=True)
  var = xg.var(axis=(1, 3), keepdims=True)
  h = ((xg - mean) / np.sqrt(var + eps)).reshape(b, hgt * wid, c) * p["norm"]["scale"] + p["norm"]["bias"]
  dense = lambda name, a: a @ p[name]["kernel"] + p[name]["bias"]
  d = c // heads
  split = lambda a: a.reshape(b, hgt * wid, heads, d).transpose(0, 2, 1, 3)  # [b, heads, n, d]
  q, k, v = (split(dense(n, h)) for n in ("q", "k", "v"))
  s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  out = (w @ v).transpose(0, 2, 1, 3).reshape(b, hgt * wid, c)
  return np.asarray(x, np.float64) + dense("proj_out", out).reshape(b, hgt, wid, c)


@pytest.mark.parametrize("head_channels, heads", [(None, 1), (64, 1), (16, 4), (8, 8)])
def test_attention_block_heads_match_float64_reference(head_channels, heads):
  from msfp_jax.models.layers import AttnBlock
  block = AttnBlock(head_channels=head_channels)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 64))
  params = block.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape), params)
  with jax.default_matmul_precision("highest"):
    out = block.apply({"params": params}, x)
  np.testing.assert_allclose(out, _attn_reference(params, x, heads, 1e-6), rtol=1e-5, atol=1e-5)
  if heads > 1:  # and it is not the single-head result
    assert not np.allclose(out, _attn_reference(params, x, 1, 1e-6), atol=1e-3)


def test_single_head_model_is_unchanged_by_the_head_field():
  """attn_head_channels defaults to None (DDPM, one head); equal to every attention width it is the same
  network, with the same parameters, the same head-free matmul shapes and bit-identical outputs."""
  assert DDPMUNetConfig().attn_head_channels is None and PRESETS["cifar10"].attn_head_channels is None
  base = DDPMUNet(config=DDPMUNetConfig(**TINY))
  same = DDPMUNet(config=DDPMUNetConfig(**TINY, attn_head_channels=64))  # attention widths: [64, 64]
  assert DDPMUNetConfig(**TINY).attention_widths == (64, 64)
  assert jax.tree.map(lambda a: a.shape, abstract_params(same)) == jax.tree.map(lambda a: a.shape,
                                                                                abstract_params(base))
  variables = _random_variables(base)
  x, t = jnp.ones((2, 8, 8, 3)), jnp.array([5, 700], jnp.int32)
  shapes = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, MatMul):
      shapes["/".join(context.module.path)] = out.shape
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(base.apply, variables, x, t)
  assert shapes["mid_attn_1/qk_matmul"] == (2, 16, 16) and shapes["mid_attn_1/av_matmul"] == (2, 16, 64)
  np.testing.assert_array_equal(jax.jit(same.apply)(variables, x, t), jax.jit(base.apply)(variables, x, t))
  # A model_config.json written before the field existed (no attn_head_channels key) builds the same model.
  legacy = {k: v for k, v in DDPMUNetConfig(**TINY).to_dict().items() if k != "attn_head_channels"}
  assert build_model("ddpm_unet", legacy)[1] == DDPMUNetConfig(**TINY)


def test_multi_head_matmuls_are_interceptable_modules_with_a_head_axis():
  model = DDPMUNet(config=DDPMUNetConfig(**TINY, attn_head_channels=16))
  x, t = model.example_inputs(2)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, t)
  shapes = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if type(context.module).__name__ == "MatMul":
      shapes["/".join(context.module.path)] = (tuple(a.shape for a in args), out.shape)
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(model.apply, variables, x, t)
  attn = ["down_1_attn_0", "down_1_attn_1", "mid_attn_1", "up_1_attn_0", "up_1_attn_1", "up_1_attn_2"]
  assert sorted(shapes) == sorted(f"{a}/{m}" for a in attn for m in ("qk_matmul", "av_matmul"))
  assert shapes["mid_attn_1/qk_matmul"] == (((2, 16, 4, 16), (2, 16, 4, 16)), (2, 4, 16, 16))
  assert shapes["mid_attn_1/av_matmul"] == (((2, 4, 16, 16), (2, 16, 4, 16)), (2, 16, 4, 16))


def test_multi_head_model_quantizes_with_attention_matmuls_and_packs(tmp_path):
  """The interceptor (per-tensor matmul quantizers) and the packed export take the head axis as it comes."""
  from msfp_jax.quant import QuantConfig, QuantRule, calibrate, prequantize_weights, quantized_apply
  from msfp_jax.quant.packed import export_packed, load_packed
  config = DDPMUNetConfig(**{**TINY, "num_res_blocks": 1}, attn_head_channels=16)
  model = DDPMUNet(config=config)
  variables = _random_variables(model)
  rng = np.random.default_rng(3)
  batches = [(jnp.asarray(rng.standard_normal((2, 8, 8, 3)), jnp.float32), jnp.array([10 * i, 900], jnp.int32))
             for i in range(2)]
  qconfig = QuantConfig(weight_bits=4, act_bits=4, rules=(QuantRule(path=".*", module_types=("MatMul",),
                                                                    act_bits=8),))
  qstate = calibrate(model, variables, batches, qconfig)
  matmuls = sorted(p for p, layer in qstate.layers.items() if layer.is_matmul)
  assert matmuls == sorted(f"{a}/{m}" for a in ("down_1_attn_0", "mid_attn_1", "up_1_attn_0", "up_1_attn_1")
                           for m in ("qk_matmul", "av_matmul"))
  x, t = batches[0]
  fp = np.asarray(jax.jit(model.apply)(variables, x, t))
  run = jax.jit(lambda v, s: quantized_apply(model, prequantize_weights(v, s), s, x, t, weights_prequantized=True))
  out = np.asarray(run(variables, qstate))
  assert np.all(np.isfinite(out)) and not np.allclose(out, fp)
  assert np.linalg.norm(out - fp) < 0.5 * np.linalg.norm(fp)
  export_packed(tmp_path / "m.msfp", [variables], qstate)
  packed = load_packed(tmp_path / "m.msfp")
  np.testing.assert_allclose(np.asarray(run(packed.variables_per_bank[0], packed.qstate)), out, rtol=1e-6,
                             atol=1e-6)


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
    ({"attn_head_channels": 24}, r"attention widths \[64\] cannot be split into heads of attn_head_channels=24"),
    ({"attn_head_channels": 0}, "attn_head_channels must be None"),
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
  assert {"ddpm_unet", "ldm_unet", "vq_f4", "kl_f8"} <= set(registered_architectures())
  assert registered_architectures()["kl_f8"].module == "msfp_jax.models.autoencoder"


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


def test_up_blocks_mark_their_skip_concatenation_for_shortcut_splitting():
  # The model holds no quantization code; it marks each [h, skip] join as a Concat module, and the layer
  # that reads the raw join (the 1x1 nin_shortcut) is what shortcut splitting applies to.
  from msfp_jax import quant
  model = DDPMUNet(config=DDPMUNetConfig(**TINY))
  variables = _random_variables(model)
  layers = quant.discover_layers(model, variables, *model.example_inputs(1))
  split = {path: info.act_split for path, info in layers.items() if info.act_split is not None}
  # Level 1 (64 channels): h is 64 wide at every block; level 0: 64 after the upsample, then 32.
  assert split == {"up_1_block_0/nin_shortcut": 64, "up_1_block_1/nin_shortcut": 64,
                   "up_1_block_2/nin_shortcut": 64, "up_0_block_0/nin_shortcut": 64,
                   "up_0_block_1/nin_shortcut": 32, "up_0_block_2/nin_shortcut": 32}
  off = quant.discover_layers(model, variables, *model.example_inputs(1),
                              config=quant.QuantConfig(split_shortcut=False))
  assert all(info.act_split is None for info in off.values())
