"""Calibration statistics: every quantized layer's inputs over all calibration batches, in bounded memory.

`collect_statistics` runs the model (jitted) over the calibration batches with the recording interceptor.
Per batch and layer input the device returns min/max over the finite values, a count of non-finite values and
a fixed-size random subsample (positions drawn on the host); the host folds them into an
`ActivationStatistics` (running min/max and a bounded uniform reservoir, float32), so memory is bounded by
layers x samples_per_layer whatever the number of batches and timesteps. The format search
(msfp_jax.quant.search) reads the result.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable

import jax
import numpy as np

from msfp_jax.quant.config import CalibrationError, QuantConfig
from msfp_jax.quant.interceptor import discover_layers, recording_interceptor
from msfp_jax.quant.rules import LayerInfo


class ActivationStatistics:
  """Running statistics of one layer input over all calibration batches (init / update / result).

  min and max are exact (float32, as the data); the values are a uniform reservoir sample (Algorithm R) of
  the per-batch subsamples, at most `capacity` float32 values: the MSE search runs on it.
  """

  def __init__(self, capacity: int, rng: np.random.Generator):
    self.capacity = capacity
    self._rng = rng
    self.min = np.float32(np.inf)
    self.max = np.float32(-np.inf)
    self.num_batches = 0
    self._reservoir = np.empty((capacity,), np.float32)
    self._seen = 0  # subsample values offered to the reservoir so far

  def update(self, minimum, maximum, samples: np.ndarray) -> None:
    samples = np.asarray(samples, np.float32).reshape(-1)
    self.min = np.minimum(self.min, np.float32(minimum))
    self.max = np.maximum(self.max, np.float32(maximum))
    self.num_batches += 1
    # Algorithm R, vectorized over the batch: the i-th value offered overall lands in slot i while the
    # reservoir fills, afterwards in a uniform slot j <= i when j < capacity (later writes win on collisions,
    # as in the sequential algorithm).
    index = self._seen + np.arange(samples.size)
    filling = index < self.capacity
    self._reservoir[index[filling]] = samples[filling]
    rest = ~filling
    if rest.any():
      slots = self._rng.integers(0, index[rest] + 1)
      keep = slots < self.capacity
      self._reservoir[slots[keep]] = samples[rest][keep]
    self._seen += samples.size

  @property
  def samples(self) -> np.ndarray:
    """The reservoir (a uniform sample of the layer input over all batches), float32."""
    return self._reservoir[:min(self._seen, self.capacity)]

  @property
  def absmax(self) -> float:
    return float(max(abs(self.min), abs(self.max)))


@dataclasses.dataclass
class CalibrationStatistics:
  """What collect_statistics gathered: the rule decisions and per-layer input statistics."""

  layers: dict[str, LayerInfo]  # every candidate layer (quantized or not), in call order
  activations: dict[str, tuple[ActivationStatistics, ...]]  # quantized layers: one per activation operand
  num_batches: int


def _as_args(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def collect_statistics(model, variables, batches: Iterable, config: QuantConfig = QuantConfig(),
                       **apply_kwargs) -> CalibrationStatistics:
  """Runs `model.apply(variables, *batch)` for every batch and records the quantized layers' inputs.

  Args:
    model: a flax.linen Module.
    variables: its variables ({'params': ...}).
    batches: an iterable of tuples of positional arguments for model.apply (a bare array is one argument).
    config: which layers (rules) and how many samples to keep.

  Raises:
    CalibrationError: no batches; NaN/Inf in a layer input (naming the first such layer in call order);
      rules that leave nothing to quantize.
    RuleMatchError: a rule matches no module.
  """
  iterator = iter(batches)
  first = next(iterator, None)
  if first is None:
    raise CalibrationError("calibration got no batches: pass an iterable of argument tuples for model.apply, "
                           "e.g. [(x, t), ...] (a generator that is already exhausted also gives this error)")
  first = _as_args(first)
  layers = discover_layers(model, variables, *first, config=config, **apply_kwargs)
  quantized = {path: info for path, info in layers.items() if info.quantized}
  if not quantized:
    raise CalibrationError(
        "the quantization rules leave no layer to quantize (layers found: "
        f"{', '.join(layers) or 'none'}); check QuantConfig.rules")

  call_order: list[str] = []

  def record(variables, uniforms, *args):
    sink: dict[str, list] = {}
    with recording_interceptor(quantized, uniforms, config.samples_per_batch, sink):
      model.apply(variables, *args, **apply_kwargs)
    call_order[:] = list(sink)  # trace-time side effect: the order layers were called in
    return sink

  record = jax.jit(record)
  rng = np.random.default_rng(config.seed)
  stats: dict[str, tuple[ActivationStatistics, ...]] = {}
  num_batches = 0
  for batch_index, args in enumerate(itertools.chain([first], map(_as_args, iterator))):
    uniforms = rng.random(config.samples_per_batch, dtype=np.float32)
    summaries = jax.device_get(record(variables, uniforms, *args))
    for path in call_order:
      for call in summaries[path]:
        for operand, summary in enumerate(call):
          if summary["nonfinite"] > 0:
            which = "" if len(call) == 1 else f" (operand {operand})"
            raise CalibrationError(
                f"calibration batch {batch_index}: the input of layer {path!r}{which} contains "
                f"{int(summary['nonfinite'])} NaN/Inf value(s); it is the first layer in call order whose input "
                "is not finite, so the problem is in the batch itself or in the model before this layer")
    for path in call_order:
      calls = summaries[path]
      if path not in stats:
        stats[path] = tuple(ActivationStatistics(config.samples_per_layer, rng) for _ in calls[0])
      for call in calls:
        for operand_stats, summary in zip(stats[path], call):
          operand_stats.update(summary["min"], summary["max"], summary["samples"])
    num_batches += 1
  missing = [path for path in quantized if path not in stats]
  if missing:
    raise CalibrationError(f"layers selected for quantization were never called during calibration: {missing}")
  return CalibrationStatistics(layers=layers, activations=stats, num_batches=num_batches)
