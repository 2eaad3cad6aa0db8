"""The two input pipelines of FID, written out so that each is exact in both resize directions.

  "pytorch-fid": float images in [0, 1] -> bilinear resize to 299 (align_corners=False, half-pixel
      centres, no antialiasing: torch.nn.functional.interpolate) -> x * 2 - 1.
  "tf": uint8 images -> TF1 bilinear resize (align_corners=False, half_pixel_centers=False) of the float
      values -> (x - 128) / 128. This is the TF graph's own preprocessing, used by the ADM evaluator and
      torch-fidelity.

jax.image.resize antialiases when downsampling, so both resizes are gathers of the two neighbours plus a
linear interpolation, with the source coordinates computed in float32 the way each library does.

Generated images arrive in [-1, 1] (`from_model_range`): the "tf" pipeline quantizes them to uint8 by
rounding (as saving a PNG does) before resizing, so scores equal those of the saved images.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PIPELINES = ("pytorch-fid", "tf")
TARGET_SIZE = 299


def check_pipeline(pipeline: str) -> str:
  if pipeline not in PIPELINES:
    raise ValueError(f"Unknown FID pipeline {pipeline!r}; choose one of {PIPELINES}.")
  return pipeline


def _torch_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Neighbour indices and weight of the second neighbour, as torch's upsample_bilinear2d (align_corners=False)."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  src = np.maximum(src, np.float32(0.0))
  lo = np.floor(src).astype(np.int64)
  lo = np.minimum(lo, in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  return lo, hi, frac


def _tf1_bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Neighbour indices and weight of the second neighbour, as TF1's resize_bilinear (legacy scaler)."""
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.arange(out_size, dtype=np.float32) * scale
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  return lo, hi, frac


def _resize_axis(x: jax.Array, axis: int, out_size: int, taps, formula: str) -> jax.Array:
  lo, hi, frac = taps(x.shape[axis], out_size)
  a = jnp.take(x, jnp.asarray(lo), axis=axis)
  b = jnp.take(x, jnp.asarray(hi), axis=axis)
  shape = [1] * x.ndim
  shape[axis] = out_size
  w = jnp.asarray(frac).reshape(shape)
  if formula == "tf":
    return a + (b - a) * w  # TF1: top + (bottom - top) * lerp
  return a * (1 - w) + b * w  # torch: w0 * a + w1 * b


def resize_bilinear_torch(x: jax.Array, size: int = TARGET_SIZE) -> jax.Array:
  """NHWC bilinear resize equal to F.interpolate(mode='bilinear', align_corners=False, antialias=False)."""
  x = _resize_axis(x, 2, size, _torch_bilinear_taps, "torch")
  return _resize_axis(x, 1, size, _torch_bilinear_taps, "torch")


def resize_bilinear_tf1(x: jax.Array, size: int = TARGET_SIZE) -> jax.Array:
  """NHWC bilinear resize equal to TF1 tf.image.resize_bilinear(align_corners=False) (no half-pixel centres)."""
  # TF interpolates along the width within each row first, then between the two rows.
  x = _resize_axis(x, 2, size, _tf1_bilinear_taps, "tf")
  return _resize_axis(x, 1, size, _tf1_bilinear_taps, "tf")


def to_rgb(images: jax.Array) -> jax.Array:
  """NHWC with 1 or 3 channels -> 3 channels (grey replicated). Anything else is an error."""
  if images.ndim != 4:
    raise ValueError(f"Images must be NHWC [batch, height, width, channels]; got shape {tuple(images.shape)}.")
  channels = images.shape[-1]
  if channels == 1:
    return jnp.repeat(images, 3, axis=-1)
  if channels != 3:
    raise ValueError(f"Images must have 1 (grey) or 3 (RGB) channels; got {channels} channels "
                     f"(shape {tuple(images.shape)}). Drop the alpha channel or convert to RGB first.")
  return images


def from_model_range(images: jax.Array, pipeline: str) -> jax.Array:
  """Images in [-1, 1] (a sampler's output) -> the pipeline's input range ([0, 1] float or uint8 values)."""
  check_pipeline(pipeline)
  unit = jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
  if pipeline == "tf":
    return jnp.round(unit * 255.0)  # uint8 values held in float32
  return unit


def from_uint8(images, pipeline: str) -> jax.Array:
  """uint8 images (files, datasets) -> the pipeline's input range."""
  check_pipeline(pipeline)
  images = jnp.asarray(images).astype(jnp.float32)
  return images if pipeline == "tf" else images / 255.0


def to_network_input(images: jax.Array, pipeline: str) -> jax.Array:
  """Pipeline-range NHWC images (any size, 1 or 3 channels) -> [B, 299, 299, 3] in the network's range."""
  check_pipeline(pipeline)
  x = to_rgb(images.astype(jnp.float32))
  if pipeline == "tf":
    if x.shape[1:3] != (TARGET_SIZE, TARGET_SIZE):
      x = resize_bilinear_tf1(x)
    return (x - 128.0) / 128.0
  if x.shape[1:3] != (TARGET_SIZE, TARGET_SIZE):
    x = resize_bilinear_torch(x)
  return x * 2.0 - 1.0
