"""Inception features of image batches on device: pipeline + network in one jitted function."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax.evaluation import preprocess
from msfp_jax.evaluation.inception_weights import FIDInception
from msfp_jax.evaluation.stats import FeatureStatistics, MomentAccumulator


class NonFiniteImagesError(ValueError):
  """Images given to the FID network contain NaN or infinity (a diverged or badly quantized model?)."""


@functools.partial(jax.jit, static_argnames=("model", "pipeline", "input_range"))
def _features(variables, images, *, model, pipeline: str, input_range: str):
  # Module-level jit with the (hashable) Flax module static: every caller with the same network, pipeline and
  # image shape shares one compilation.
  finite = jnp.all(jnp.isfinite(images))
  if input_range == "model":
    x = preprocess.from_model_range(images, pipeline)
  else:
    x = preprocess.from_uint8(images, pipeline)
  out = dict(model.apply(variables, preprocess.to_network_input(x, pipeline)))
  out["finite"] = finite
  return out


def make_feature_fn(inception: FIDInception, pipeline: str, *, input_range: str = "model") -> Callable:
  """fn(images NHWC) -> {"pool3", "spatial", ["logits"], "finite"}, jitted; sharded inputs stay sharded.

  input_range: "model" for images in [-1, 1] (a sampler's output), "uint8" for 0..255 values (files).
  "finite" is a scalar bool: whether every input value was finite (checked on the host by the callers).
  """
  preprocess.check_pipeline(pipeline)
  if input_range not in ("model", "uint8"):
    raise ValueError(f"input_range must be 'model' or 'uint8', got {input_range!r}")
  return functools.partial(_features, inception.variables, model=inception.model, pipeline=pipeline,
                           input_range=input_range)


def check_images(images, *, what: str = "images") -> None:
  """Shape check before anything is traced: NHWC with 1 or 3 channels, at least one image."""
  shape = np.shape(images)
  if len(shape) != 4:
    raise ValueError(f"{what} must be NHWC [batch, height, width, channels]; got shape {shape}.")
  if shape[-1] not in (1, 3):
    raise ValueError(f"{what} must have 1 (grey) or 3 (RGB) channels; got {shape[-1]} (shape {shape}). "
                     "Drop the alpha channel or convert to RGB first.")
  if shape[0] == 0:
    raise ValueError(f"{what}: empty batch.")


def raise_if_not_finite(out, what: str = "images") -> None:
  if not bool(out["finite"]):
    raise NonFiniteImagesError(f"The {what} contain NaN or infinity; FID would be meaningless. Check the model "
                               "(a diverged or badly quantized network gives NaN samples).")


class StatisticsBuilder:
  """Accumulates pool3 / spatial moments (float64) and IS logits from feature batches.

  Dimensions come from the first batch (2048 and 2023 for the FID network).
  """

  def __init__(self, keep_logits: bool):
    self.pool3: MomentAccumulator | None = None
    self.spatial: MomentAccumulator | None = None
    self.keep_logits = keep_logits
    self.logits: list[np.ndarray] = []

  def add(self, out, keep: int | None = None) -> None:
    pool3 = np.asarray(out["pool3"])[:keep]
    spatial = np.asarray(out["spatial"])[:keep]
    if self.pool3 is None:
      self.pool3 = MomentAccumulator(pool3.shape[1])
      self.spatial = MomentAccumulator(spatial.shape[1])
    self.pool3.update(pool3)
    self.spatial.update(spatial)
    if self.keep_logits and "logits" in out:
      self.logits.append(np.asarray(out["logits"], np.float32)[:keep])

  def statistics(self) -> FeatureStatistics:
    if self.pool3 is None:
      raise ValueError("No images were given: statistics need at least 2.")
    mu, sigma = self.pool3.mean_cov(what="pool3 features")
    mu_s, sigma_s = self.spatial.mean_cov(what="sFID spatial features")
    return FeatureStatistics(mu, sigma, self.pool3.count, mu_s, sigma_s)


def statistics_of_uint8_batches(batches: Iterable[np.ndarray], inception: FIDInception, pipeline: str, *,
                                batch_size: int = 50, what: str = "images") -> FeatureStatistics:
  """FeatureStatistics of uint8 NHWC images given in batches of any size (re-batched to `batch_size`).

  The last partial batch is padded (and the padding dropped) so each image size compiles once.
  """
  fn = make_feature_fn(inception, pipeline, input_range="uint8")
  builder = StatisticsBuilder(keep_logits=False)
  pending: list[np.ndarray] = []

  def flush(chunk: np.ndarray):
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    out = fn(chunk)
    raise_if_not_finite(out, what)
    builder.add(out, keep=n)

  for batch in batches:
    batch = np.asarray(batch)
    check_images(batch, what=what)
    if pending and pending[0].shape[1:] != batch.shape[1:]:
      flush(np.concatenate(pending))
      pending = []
    pending.append(batch)
    joined = np.concatenate(pending)
    while len(joined) >= batch_size:
      flush(joined[:batch_size])
      joined = joined[batch_size:]
    pending = [joined] if len(joined) else []
  if pending:
    flush(np.concatenate(pending))
  return builder.statistics()
