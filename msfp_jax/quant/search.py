"""The per-layer format search of method.md section 3, and `calibrate` (statistics, then the search).

`search_quant_state` chooses, per layer, the weight format and per-output-channel maxval (signed FP, or
asymmetric INT) and the activation format, maxval and zero point (signed; unsigned + zero point for one-sided
inputs), minimizing the quantization MSE, which msfp_jax.quant.mse measures exactly for every candidate grid.
A format's grid for maxval m is m / natural_max times its natural grid (the real-valued bias follows m), so one
unit grid per format serves all maxvals.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np

from msfp_jax.quant.config import CalibrationError, QuantConfig
from msfp_jax.quant.fake_quant import grid_scale_numpy
from msfp_jax.quant.formats import FPFormat
from msfp_jax.quant.mse import SortedRows, chunked_sse, nearest_level_sse
from msfp_jax.quant.state import LayerQuantState, QuantState
from msfp_jax.quant.statistics import CalibrationStatistics, collect_statistics
from msfp_jax.quant.trees import params_at


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
    normalized = SortedRows(rows / scale[:, None])
    low_n = low / scale
    unit = _unit_grid(fmt)
    # levels[r, q] = c_q * (low_n[r] + unit): zero point c * low, maxval c * width (in units of `scale`).
    levels_fn = lambda s: factors[None, :, None] * (low_n[s, None, None] + unit[None, None, :])
    sse = chunked_sse(normalized, levels_fn, len(factors), len(unit)) * (scale ** 2)[:, None]
    best = np.argmin(sse, axis=1)
    c = factors[best]
    return WeightChoice(format=fmt, maxval=(c * scale).astype(np.float32), zero_point=(c * low).astype(np.float32),
                        mse=float(sse[np.arange(num_out), best].sum() / rows.size))
  absmax = np.abs(rows).max(axis=1)
  scale = np.where(absmax > 0, absmax, 1.0)  # an all-zero channel quantizes to 0 whatever its maxval
  normalized = SortedRows(rows / scale[:, None])  # sorted once, scored for every format
  best_choice = None
  for fmt in FPFormat.candidates(bits, signed=True):
    unit = _unit_grid(fmt)
    levels_fn = lambda s, unit=unit: np.broadcast_to(factors[:, None] * unit[None, :],
                                                     (len(range(num_out)[s]), len(factors), len(unit)))
    sse = chunked_sse(normalized, levels_fn, len(factors), len(unit)) * (scale ** 2)[:, None]
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
  xn = SortedRows((x / scale)[None, :])  # normalized so the binary-search offsets stay well conditioned
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
    sse = nearest_level_sse(xn, levels[None])[0]
    q = int(np.argmin(sse))
    if best is None or sse[q] < best[0]:
      best = (sse[q], fmt, maxvals[q] * scale, z[q] * scale if shifted else None)
  sse, fmt, maxval, zero_point = best
  if zero_point is not None and config.zero_point_on_grid:
    zero_point = _exact_grid_zero_point(zero_point * 1.0, maxval, fmt)
  return ActivationChoice(format=fmt, maxval=float(maxval), zero_point=None if zero_point is None else
                          float(zero_point), mse=float(sse * scale ** 2 / x.size), one_sided=one_sided)


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
