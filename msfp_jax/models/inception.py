"""The FID Inception-v3 network (TF's `inception-2015-12-05` graph) in Flax.

Module names follow pytorch-fid's weight keys (`Conv2d_1a_3x3`, ..., `Mixed_7c`, `fc`; inside a block
`branch1x1`, `branch5x5_1`, ...; inside each conv `conv` and `bn`), so a pytorch-fid state dict maps onto
the params tree by renaming leaves only. Weights are never injected through initializers: build the
tree with `msfp_jax.evaluation.inception_weights.load_inception`, which checks every leaf's shape against
`model.init`.

This is the FID variant of torchvision's Inception-v3, not the stock one:
  * Mixed_5b/5c/5d (FIDInceptionA), Mixed_6b..6e (FIDInceptionC) and Mixed_7b (FIDInceptionE_1) average-
    pool their pool branch with count_include_pad=False (TF's SAME average pool);
  * Mixed_7c (FIDInceptionE_2) max-pools its pool branch;
  * BatchNorm epsilon 1e-3; convolutions have no bias; the fc layer (1008 classes) is used without its bias
    for the Inception Score, as in the original TF code (logits = pool3 @ W).

Input: NHWC float32, 299x299, values in [-1, 1] (see msfp_jax.evaluation.preprocess for the pipelines).
Output: a dict with
  "pool3"   [B, 2048]  the FID features,
  "spatial" [B, 2023]  the sFID features: Mixed_6d.branch1x1 after BN+ReLU, channels 0..6, 17x17, HWC order,
  "logits"  [B, 1008]  only when `with_logits` (needs the fc weights, which only pytorch-fid's .pth has).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
POOL3_DIM = 2048
NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023

# Every BasicConv2d of the network, in pytorch-fid's registration order (block, branch). The TorchScript
# of the same network lists its conv+BN groups in exactly this order; the loader relies on it.
BLOCK_BRANCHES: dict[str, tuple[str, ...]] = {}
_STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3")
_A = ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3",
      "branch_pool")
_B = ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3")
_C = ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1", "branch7x7dbl_2",
      "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool")
_D = ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4")
_E = ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1", "branch3x3dbl_2",
      "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool")
_BLOCKS = (("Mixed_5b", _A), ("Mixed_5c", _A), ("Mixed_5d", _A), ("Mixed_6a", _B), ("Mixed_6b", _C),
           ("Mixed_6c", _C), ("Mixed_6d", _C), ("Mixed_6e", _C), ("Mixed_7a", _D), ("Mixed_7b", _E),
           ("Mixed_7c", _E))


def basic_conv_paths() -> list[tuple[str, ...]]:
  """Module paths of the 94 BasicConv2d layers, in pytorch-fid's registration order."""
  paths = [(name,) for name in _STEM]
  for block, branches in _BLOCKS:
    paths.extend((block, branch) for branch in branches)
  return paths


Padding = str | Sequence[tuple[int, int]]


BN_EPSILON = 1e-3


def fold_batch_norm(variables: dict) -> dict:
  """{"params", "batch_stats"} of the network -> {"params"} of the folded network (`folded=True`).

  conv(x) * g / sqrt(v + eps) + (b - m * g / sqrt(v + eps)) is one conv with a bias: the inference network
  then reads each activation once instead of twice. The products are formed in float64 and rounded once.
  """
  params, stats = variables["params"], variables["batch_stats"]

  def fold(p, s):
    if "conv" in p and "bn" in p:
      scale = np.asarray(p["bn"]["scale"], np.float64) / np.sqrt(np.asarray(s["bn"]["var"], np.float64)
                                                                 + BN_EPSILON)
      kernel = np.asarray(p["conv"]["kernel"], np.float64) * scale
      bias = np.asarray(p["bn"]["bias"], np.float64) - np.asarray(s["bn"]["mean"], np.float64) * scale
      return {"conv": {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}}
    return {k: fold(v, s.get(k, {})) if isinstance(v, dict) else v for k, v in p.items()}

  return {"params": fold(jax.tree.map(np.asarray, dict(params)), jax.tree.map(np.asarray, dict(stats)))}


class BasicConv2d(nn.Module):
  """Convolution without bias, BatchNorm (eps 1e-3, running statistics) and ReLU."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  padding: Padding = "VALID"
  precision: str = "highest"
  folded: bool = False  # batch norm folded into the conv's kernel and a bias (fold_batch_norm)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel_size, strides=self.strides, padding=self.padding,
                use_bias=self.folded, precision=self.precision, name="conv")(x)
    if not self.folded:
      x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
    return nn.relu(x)


def _pad(kh: int, kw: int) -> list[tuple[int, int]]:
  # Symmetric "same" padding for odd kernels, as torch's padding=(kh//2, kw//2).
  return [(kh // 2, kh // 2), (kw // 2, kw // 2)]


class _Block(nn.Module):
  """The attributes every Mixed block hands to its convs (keyword-only, after the block's own)."""
  _: dataclasses.KW_ONLY
  precision: str = "highest"
  folded: bool = False


def _branch(block: _Block, x, *layers: tuple):
  """`x` through the BasicConv2d layers of `block`, one after another: each (features, kernel size, name) or
  (features, kernel size, name, 2). Stride 1 pads to keep the spatial size, stride 2 does not pad (VALID)."""
  for features, kernel_size, name, *strides in layers:
    stride = strides[0] if strides else 1
    x = BasicConv2d(features, kernel_size, strides=stride, padding=_pad(*kernel_size) if stride == 1 else "VALID",
                    precision=block.precision, folded=block.folded, name=name)(x)
  return x


def _avg_pool_3x3_same(x):
  # count_include_pad=False: border windows average only the pixels inside the image (TF SAME pooling).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x):
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_stride2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class FIDInceptionA(_Block):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _branch(self, x, (64, (1, 1), "branch1x1"))
    b5 = _branch(self, x, (48, (1, 1), "branch5x5_1"), (64, (5, 5), "branch5x5_2"))
    b3 = _branch(self, x, (64, (1, 1), "branch3x3dbl_1"), (96, (3, 3), "branch3x3dbl_2"),
                 (96, (3, 3), "branch3x3dbl_3"))
    bp = _branch(self, _avg_pool_3x3_same(x), (self.pool_features, (1, 1), "branch_pool"))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a: the 35x35 -> 17x17 grid reduction."""

  @nn.compact
  def __call__(self, x):
    b3 = _branch(self, x, (384, (3, 3), "branch3x3", 2))
    bd = _branch(self, x, (64, (1, 1), "branch3x3dbl_1"), (96, (3, 3), "branch3x3dbl_2"),
                 (96, (3, 3), "branch3x3dbl_3", 2))
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class FIDInceptionC(_Block):
  """Returns (output, branch1x1 output); the latter gives the sFID features at Mixed_6d."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = _branch(self, x, (192, (1, 1), "branch1x1"))
    b7 = _branch(self, x, (c7, (1, 1), "branch7x7_1"), (c7, (1, 7), "branch7x7_2"), (192, (7, 1), "branch7x7_3"))
    bd = _branch(self, x, (c7, (1, 1), "branch7x7dbl_1"), (c7, (7, 1), "branch7x7dbl_2"),
                 (c7, (1, 7), "branch7x7dbl_3"), (c7, (7, 1), "branch7x7dbl_4"), (192, (1, 7), "branch7x7dbl_5"))
    bp = _branch(self, _avg_pool_3x3_same(x), (192, (1, 1), "branch_pool"))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(_Block):
  """Mixed_7a: the 17x17 -> 8x8 grid reduction."""

  @nn.compact
  def __call__(self, x):
    b3 = _branch(self, x, (192, (1, 1), "branch3x3_1"), (320, (3, 3), "branch3x3_2", 2))
    b7 = _branch(self, x, (192, (1, 1), "branch7x7x3_1"), (192, (1, 7), "branch7x7x3_2"),
                 (192, (7, 1), "branch7x7x3_3"), (192, (3, 3), "branch7x7x3_4", 2))
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class FIDInceptionE(_Block):
  """FIDInceptionE_1 (pool="avg", Mixed_7b) and FIDInceptionE_2 (pool="max", Mixed_7c)."""
  pool: str

  @nn.compact
  def __call__(self, x):
    b1 = _branch(self, x, (320, (1, 1), "branch1x1"))
    b3 = _branch(self, x, (384, (1, 1), "branch3x3_1"))
    b3 = jnp.concatenate([_branch(self, b3, (384, (1, 3), "branch3x3_2a")),
                          _branch(self, b3, (384, (3, 1), "branch3x3_2b"))], axis=-1)
    bd = _branch(self, x, (448, (1, 1), "branch3x3dbl_1"), (384, (3, 3), "branch3x3dbl_2"))
    bd = jnp.concatenate([_branch(self, bd, (384, (1, 3), "branch3x3dbl_3a")),
                          _branch(self, bd, (384, (3, 1), "branch3x3dbl_3b"))], axis=-1)
    pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool_3x3_same(x)
    bp = _branch(self, pooled, (192, (1, 1), "branch_pool"))
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID Inception-v3. See the module docstring for inputs and outputs."""
  with_logits: bool = False
  precision: str = "highest"  # full float32 convs on accelerators too (TF32/bf16 would shift FID)
  folded: bool = False

  @nn.compact
  def __call__(self, x) -> dict[str, jax.Array]:
    if x.ndim != 4 or x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f"FIDInceptionV3 expects NHWC images of shape [B, 299, 299, 3]; got {x.shape}. "
                       "Resize with msfp_jax.evaluation.preprocess first.")
    p = self.precision
    x = BasicConv2d(32, (3, 3), strides=2, precision=p, folded=self.folded, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), precision=p, folded=self.folded, name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=_pad(3, 3), precision=p, folded=self.folded, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride2(x)
    x = BasicConv2d(80, (1, 1), precision=p, folded=self.folded, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), precision=p, folded=self.folded, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_stride2(x)
    x = FIDInceptionA(32, precision=p, folded=self.folded, name="Mixed_5b")(x)
    x = FIDInceptionA(64, precision=p, folded=self.folded, name="Mixed_5c")(x)
    x = FIDInceptionA(64, precision=p, folded=self.folded, name="Mixed_5d")(x)
    x = InceptionB(precision=p, folded=self.folded, name="Mixed_6a")(x)
    x, _ = FIDInceptionC(128, precision=p, folded=self.folded, name="Mixed_6b")(x)
    x, _ = FIDInceptionC(160, precision=p, folded=self.folded, name="Mixed_6c")(x)
    x, mixed_6d_branch1x1 = FIDInceptionC(160, precision=p, folded=self.folded, name="Mixed_6d")(x)
    x, _ = FIDInceptionC(192, precision=p, folded=self.folded, name="Mixed_6e")(x)
    x = InceptionD(precision=p, folded=self.folded, name="Mixed_7a")(x)
    x = FIDInceptionE("avg", precision=p, folded=self.folded, name="Mixed_7b")(x)
    x = FIDInceptionE("max", precision=p, folded=self.folded, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    spatial = mixed_6d_branch1x1[..., :SPATIAL_CHANNELS]
    out = {"pool3": pool3, "spatial": spatial.reshape(spatial.shape[0], -1)}
    if self.with_logits:
      # The TF graph's IS logits use the fc weight without its bias.
      out["logits"] = nn.Dense(NUM_LOGITS, use_bias=False, precision=p, name="fc")(pool3)
    return out
