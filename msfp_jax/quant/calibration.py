"""Calibration: input statistics of every quantized layer, then the per-layer search of method.md section 3.

Two stages, both public so that reports can look at the statistics:

* `collect_statistics` runs the model (jitted) over the calibration batches with the recording interceptor.
  Per batch and layer input the device returns min/max over the finite values, a count of non-finite values
  and a fixed-size random subsample (positions drawn on the host); the host folds them into an
  `ActivationStatistics` (running min/max and a bounded uniform reservoir, float32), so memory is bounded by layers x samples_per_layer whatever the
  number of batches and timesteps.
* `search_quant_state` chooses, per layer, the weight format and per-output-channel maxval (signed FP, or
  asymmetric INT) and the activation format, maxval and zero point (signed; unsigned + zero point for
  one-sided inputs), minimizing the quantization MSE.

How the search measures MSE: rounding to a grid maps each value to its nearest grid level (saturating at the
ends), so for sorted samples with prefix sums of x and x^2 the squared error of a whole candidate grid is
sum over cells of (S2 - 2 g S1 + n g^2), with the cell boundaries found by binary search of the midpoints
between levels. That costs O(levels x log N) per candidate instead of O(N) fake-quant evaluations, so
the full grid (formats x ~100 maxvals x zero points) is searched exactly on 35.7M weights and 65536 samples
per input in seconds on a CPU, with no compilation per layer shape. It equals the MSE of fake_quant up to
ties (values exactly half-way between two levels), which has measure zero; a test checks the two agree.
A format's grid for maxval m is m / natural_max times its natural grid (the real-valued bias follows m), so
one unit grid per format serves all maxvals.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable

import jax
import numpy as np

from msfp_jax.quant.config import CalibrationError, QuantConfig
from msfp_jax.quant.fake_quant import grid_scale_numpy
from msfp_jax.quant.formats import FPFormat
from msfp_jax.quant.interceptor import discover_layers, params_at, recording_interceptor
from msfp_jax.quant.rules import LayerInfo
from msfp_jax.quant.state import LayerQuantState, QuantState

# Bound on the elements of the [rows, candidates, levels] work arrays of one search step (~8 bytes each).
_SEARCH_CHUNK_ELEMENTS = 2_000_000


# ============================================================================= statistics
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


# ============================================================================= the MSE search
class _SortedRows:
  """Rows of values sorted ascending with their prefix sums: what every candidate grid is scored against."""

  def __init__(self, rows: np.ndarray):
    self.values = np.sort(np.asarray(rows, np.float64), axis=1)  # [R, N]
    num_rows, n = self.values.shape
    self.prefix = np.zeros((num_rows, n + 1))  # prefix[r, i] = sum of the i smallest values of row r
    np.cumsum(self.values, axis=1, out=self.prefix[:, 1:])
    self.total_square = np.sum(self.values * self.values, axis=1)  # [R]

  def __len__(self):
    return self.values.shape[0]

  def rows(self, s: slice) -> "_SortedRows":
    out = object.__new__(_SortedRows)
    out.values, out.prefix, out.total_square = self.values[s], self.prefix[s], self.total_square[s]
    return out


def _nearest_level_sse(rows: _SortedRows, levels: np.ndarray) -> np.ndarray:
  """Sum of squared distances of each row's values to the nearest of each candidate's levels.

  Args:
    rows: R sorted rows of N values with prefix sums.
    levels: [R, Q, L] float64 (may be a broadcast view), each candidate's levels sorted ascending.
  Returns:
    [R, Q] float64.

  With p_j the number of values below the midpoint between levels j-1 and j (the cell boundaries), S(i) the
  sum of the i smallest values and g the levels, summing (x - g)^2 cell by cell telescopes to
    sum x^2 - 2 (g_last S(N) + sum_j S(p_j) (g_{j-1} - g_j)) + (g_last^2 N + sum_j p_j (g_{j-1}^2 - g_j^2)),
  one gather per boundary.
  """
  values, prefix = rows.values, rows.prefix
  num_rows, n = values.shape
  _, num_candidates, num_levels = levels.shape
  mids = (0.5 * (levels[..., 1:] + levels[..., :-1])).reshape(num_rows, -1)
  # One binary search for all rows: shift row r by r * span (span exceeds the width of any row's values and
  # levels), so the concatenated rows are globally sorted and each row's midpoints fall in its own block.
  # Sorting the queries lets numpy's searchsorted reuse the previous position (much faster on big arrays).
  span = 2.0 * max(float(np.abs(values).max(initial=0.0)), float(np.abs(mids).max(initial=0.0))) + 1.0
  offsets = span * np.arange(num_rows, dtype=np.float64)
  if levels.strides[0] == 0:  # the same candidates for every row (a broadcast view): sort them once
    order = np.broadcast_to(np.argsort(mids[0]), mids.shape)
  else:
    order = np.argsort(mids, axis=1)
  queries = np.take_along_axis(mids, order, axis=1) + offsets[:, None]
  sorted_positions = np.searchsorted((values + offsets[:, None]).ravel(), queries.ravel()).reshape(num_rows, -1)
  sorted_positions -= (n * np.arange(num_rows))[:, None]
  positions = np.empty_like(sorted_positions)
  np.put_along_axis(positions, order, sorted_positions, axis=1)
  np.clip(positions, 0, n, out=positions)
  positions = positions.reshape(num_rows, num_candidates, num_levels - 1)
  below_sums = prefix.ravel()[positions + ((n + 1) * np.arange(num_rows))[:, None, None]]
  step = levels[..., :-1] - levels[..., 1:]
  step_square = levels[..., :-1] ** 2 - levels[..., 1:] ** 2
  last = levels[..., -1]
  linear = last * prefix[:, -1:] + np.sum(below_sums * step, axis=-1)
  quadratic = last * last * n + np.sum(positions * step_square, axis=-1)
  sse = rows.total_square[:, None] - 2.0 * linear + quadratic
  return np.maximum(sse, 0.0)


def _chunked_sse(rows: _SortedRows, levels_fn, num_candidates: int, num_levels: int) -> np.ndarray:
  """_nearest_level_sse over row chunks; levels_fn(row_slice) -> [r, Q, L] levels for those rows."""
  step = max(1, _SEARCH_CHUNK_ELEMENTS // max(1, num_candidates * num_levels))
  out = [_nearest_level_sse(rows.rows(slice(i, i + step)), levels_fn(slice(i, i + step)))
         for i in range(0, len(rows), step)]
  return np.concatenate(out, axis=0)


def maxval_factors(config: QuantConfig) -> np.ndarray:
  """The c grid: maxval candidates are c * absmax (method.md section 3)."""
  return np.linspace(config.maxval_grid_min, config.maxval_grid_max, config.maxval_grid_size)


def _unit_grid(fmt: FPFormat) -> np.ndarray:
  return fmt.grid(1.0)  # levels for maxval = 1 (signed: [-1, 1]; unsigned: [0, 1])


@dataclasses.dataclass(frozen=True)
class WeightChoice:
  format: FPFormat
  maxval: np.ndarray  # [out]
  zero_point: np.ndarray | None  # [out] for unsigned (INT) formats
  mse: float


@dataclasses.dataclass(frozen=True)
class ActivationChoice:
  format: FPFormat
  maxval: float
  zero_point: float | None
  mse: float
  one_sided: bool


def search_weight_quantizer(kernel, bits: int, config: QuantConfig) -> WeightChoice:
  """Per-output-channel weight quantizer: the format with the least total MSE, the best maxval per channel.

  FP: signed candidates at `bits`, maxval = c * absmax per channel. INT (config.kind == "int"): asymmetric
  uINT<bits> per channel with zero point c * min(min_ch, 0) and maxval c * (max(max_ch, 0) - min(min_ch, 0)).
  """
  kernel = np.asarray(kernel, np.float64)
  if not np.all(np.isfinite(kernel)):
    raise CalibrationError("a kernel contains NaN/Inf; the model's weights are broken")
  rows = kernel.reshape(-1, kernel.shape[-1]).T  # [out, fan_in]
  factors = maxval_factors(config)
  num_out = rows.shape[0]
  if config.kind == "int":
    fmt = FPFormat(0, bits, signed=False)
    low = np.minimum(rows.min(axis=1), 0.0)
    width = np.maximum(rows.max(axis=1), 0.0) - low
    scale = np.where(width > 0, width, 1.0)
    normalized = _SortedRows(rows / scale[:, None])
    low_n = low / scale
    unit = _unit_grid(fmt)
    # levels[r, q] = c_q * (low_n[r] + unit): zero point c * low, maxval c * width (in units of `scale`).
    levels_fn = lambda s: factors[None, :, None] * (low_n[s, None, None] + unit[None, None, :])
    sse = _chunked_sse(normalized, levels_fn, len(factors), len(unit)) * (scale ** 2)[:, None]
    best = np.argmin(sse, axis=1)
    c = factors[best]
    return WeightChoice(format=fmt, maxval=(c * scale).astype(np.float32), zero_point=(c * low).astype(np.float32),
                        mse=float(sse[np.arange(num_out), best].sum() / rows.size))
  absmax = np.abs(rows).max(axis=1)
  scale = np.where(absmax > 0, absmax, 1.0)  # an all-zero channel quantizes to 0 whatever its maxval
  normalized = _SortedRows(rows / scale[:, None])  # sorted once, scored for every format
  best_choice = None
  for fmt in FPFormat.candidates(bits, signed=True):
    unit = _unit_grid(fmt)
    levels_fn = lambda s, unit=unit: np.broadcast_to(factors[:, None] * unit[None, :],
                                                     (len(range(num_out)[s]), len(factors), len(unit)))
    sse = _chunked_sse(normalized, levels_fn, len(factors), len(unit)) * (scale ** 2)[:, None]
    best = np.argmin(sse, axis=1)
    total = float(sse[np.arange(num_out), best].sum())
    if best_choice is None or total < best_choice[0]:
      best_choice = (total, fmt, (factors[best] * scale).astype(np.float32))
  total, fmt, maxval = best_choice
  return WeightChoice(format=fmt, maxval=maxval, zero_point=None, mse=total / rows.size)


def is_one_sided(minimum: float, maximum: float, alpha: float) -> bool:
  """method.md section 3 (our choice): one-sided when the max is positive and min > -alpha * max.

  This covers inputs whose negative tail is small against the positive side (SiLU: min about -0.28) and
  inputs with no negative values at all.
  """
  return maximum > 0 and minimum > -alpha * maximum


def zero_point_on_grid(zero_point: np.ndarray, maxval: np.ndarray, unit_grid: np.ndarray) -> np.ndarray:
  """The zero point nearest to `zero_point` that puts real 0 on the grid z + maxval * unit_grid.

  0 is a level exactly when -z is one: z = -maxval * u_k for a unit-grid level u_k (u_0 = 0 gives z = 0).
  Each candidate keeps its maxval and moves its z to the nearest such value, so the search covers the
  same spans as with free zero points.
  """
  ratio = np.clip(-np.asarray(zero_point, np.float64) / maxval, unit_grid[0], unit_grid[-1])
  upper = np.clip(np.searchsorted(unit_grid, ratio), 1, len(unit_grid) - 1)
  nearest = np.where(ratio - unit_grid[upper - 1] <= unit_grid[upper] - ratio, unit_grid[upper - 1],
                     unit_grid[upper])
  return -maxval * nearest


def _exact_grid_zero_point(zero_point: float, maxval: float, fmt: FPFormat) -> float:
  """-y_k * s in float32 for fake_quant's scale s and the natural level y_k nearest -z / s: then
  fake_quant(0) = y_k * s + z is exactly 0 (both products are exact, see fake_quant.grid_scale)."""
  scale = grid_scale_numpy(np.float32(maxval), fmt)
  natural = fmt.grid()
  level = natural[np.argmin(np.abs(natural - (-zero_point / float(scale))))]
  return float(-(np.float32(level) * scale))


def search_activation_quantizer(samples: np.ndarray, minimum: float, maximum: float, bits: int,
                                sign_mode: str, config: QuantConfig) -> ActivationChoice:
  """Per-tensor activation quantizer minimizing the MSE on `samples` (method.md section 3).

  FP: signed candidates (maxval = c * absmax) unless sign_mode is "unsigned" and the input is one-sided;
  for one-sided inputs with sign_mode "search" or "unsigned" also unsigned candidates with zero points z
  spread from the observed minimum to 0 and maxval = c * (max - z). INT: asymmetric uINT<bits> with the same
  zero-point and maxval grid (z from min(minimum, 0) to 0), whatever the sign mode. With
  config.zero_point_on_grid each z moves to the nearest value that makes real 0 a grid level
  (zero_point_on_grid).
  """
  x = np.sort(np.asarray(samples, np.float64).reshape(-1))
  if x.size == 0:
    raise CalibrationError("no calibration samples for an activation")
  minimum, maximum = float(minimum), float(maximum)
  absmax = max(abs(minimum), abs(maximum))
  scale = absmax if absmax > 0 else 1.0
  xn = _SortedRows((x / scale)[None, :])  # normalized so the binary-search offsets stay well conditioned
  factors = maxval_factors(config)
  one_sided = is_one_sided(minimum, maximum, config.one_sided_alpha)
  candidates: list[tuple[FPFormat, bool]] = []  # (format, with zero point)
  if config.kind == "int":
    candidates.append((FPFormat(0, bits, signed=False), True))
  else:
    if not (one_sided and sign_mode == "unsigned"):
      candidates += [(f, False) for f in FPFormat.candidates(bits, signed=True)]
    if one_sided and sign_mode in ("search", "unsigned"):
      candidates += [(f, True) for f in FPFormat.candidates(bits, signed=False)]
  zero_points = np.unique(np.linspace(min(minimum, 0.0), 0.0, config.zero_point_grid_size)) / scale
  best = None
  for fmt, shifted in candidates:
    unit = _unit_grid(fmt)
    if shifted:
      z = np.repeat(zero_points, len(factors))  # candidate q = (z_i, c_j)
      c = np.tile(factors, len(zero_points))
      top = max(maximum / scale, 0.0)
      maxvals = c * np.maximum(top - z, np.finfo(np.float32).tiny)
      if config.zero_point_on_grid:
        z = zero_point_on_grid(z, maxvals, unit)
      levels = z[:, None] + maxvals[:, None] * unit[None, :]
    else:
      z = np.zeros(len(factors))
      maxvals = factors * 1.0  # absmax is 1 in normalized units
      levels = maxvals[:, None] * unit[None, :]
    sse = _nearest_level_sse(xn, levels[None])[0]
    q = int(np.argmin(sse))
    if best is None or sse[q] < best[0]:
      best = (sse[q], fmt, maxvals[q] * scale, z[q] * scale if shifted else None)
  sse, fmt, maxval, zero_point = best
  if zero_point is not None and config.zero_point_on_grid:
    zero_point = _exact_grid_zero_point(zero_point * 1.0, maxval, fmt)
  return ActivationChoice(format=fmt, maxval=float(maxval), zero_point=None if zero_point is None else
                          float(zero_point), mse=float(sse * scale ** 2 / x.size), one_sided=one_sided)


# ============================================================================= the QuantState
def search_quant_state(statistics: CalibrationStatistics, variables, config: QuantConfig = QuantConfig()
                       ) -> QuantState:
  """Searches every quantized layer's quantizers from collected statistics; returns the QuantState."""
  params = variables["params"] if "params" in variables else None
  layers = {}
  for path, info in statistics.layers.items():
    if not info.quantized:
      continue
    operands = statistics.activations[path]
    acts = [search_activation_quantizer(s.samples, s.min, s.max, info.act_bits, info.sign_mode, config)
            for s in operands]
    kwargs: dict[str, Any] = {}
    if not info.is_matmul:
      if params is None:
        raise CalibrationError("variables have no 'params' collection to read the kernels from")
      weight = search_weight_quantizer(params_at(params, path)["kernel"], info.weight_bits, config)
      kwargs.update(weight_format=weight.format, weight_maxval=np.asarray(weight.maxval, np.float32),
                    weight_zero_point=None if weight.zero_point is None else np.asarray(weight.zero_point,
                                                                                        np.float32),
                    weight_mse=weight.mse)
    else:
      rhs = acts[1]
      kwargs.update(rhs_act_format=rhs.format, rhs_act_maxval=np.float32(rhs.maxval),
                    rhs_act_zero_point=None if rhs.zero_point is None else np.float32(rhs.zero_point),
                    rhs_act_mse=rhs.mse)
    if info.act_split is not None:
      skip = acts[1]
      kwargs.update(act_split=info.act_split, skip_act_format=skip.format, skip_act_maxval=np.float32(skip.maxval),
                    skip_act_zero_point=None if skip.zero_point is None else np.float32(skip.zero_point),
                    skip_act_mse=skip.mse, skip_one_sided=skip.one_sided,
                    skip_act_range=(float(operands[1].min), float(operands[1].max)))
    act = acts[0]
    layers[path] = LayerQuantState(
        module_type=info.module_type, act_format=act.format, act_maxval=np.float32(act.maxval),
        act_zero_point=None if act.zero_point is None else np.float32(act.zero_point), one_sided=act.one_sided,
        act_range=(float(operands[0].min), float(operands[0].max)), act_mse=act.mse, **kwargs)
  layers = jax.tree.map(jax.numpy.asarray, layers)
  unquantized = tuple(path for path, info in statistics.layers.items() if not info.quantized)
  return QuantState(layers=layers, kind=config.kind, unquantized=unquantized)


def calibrate(model, variables, batches: Iterable, config: QuantConfig = QuantConfig(), *,
              return_statistics: bool = False, **apply_kwargs):
  """Calibrates `model`: collect_statistics over `batches`, then search_quant_state.

  Args:
    model, variables: the Flax module and its variables.
    batches: an iterable of tuples of positional arguments for model.apply (e.g. [(x_t, t), ...] gathered along
      the FP sampler's trajectories).
    config: bits, kind, sign mode, rules and search grid.
    return_statistics: also return the CalibrationStatistics (for reports and histograms).

  Returns:
    QuantState, or (QuantState, CalibrationStatistics) with return_statistics.
  """
  statistics = collect_statistics(model, variables, batches, config, **apply_kwargs)
  qstate = search_quant_state(statistics, variables, config)
  return (qstate, statistics) if return_statistics else qstate
