"""Per-layer calibration report: a table (printed and saved as JSON) and activation histograms (PNG)."""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from msfp_jax import plotting
from msfp_jax.quant.state import QuantState

_COLUMNS = (("path", "path"), ("type", "module_type"), ("weight", "weight_format"), ("w_mse", "weight_mse"),
            ("act", "act_format"), ("sign", "act_sign"), ("act_maxval", "act_maxval"),
            ("act_zero_point", "act_zero_point"), ("act_min", "act_min"), ("act_max", "act_max"),
            ("a_mse", "act_mse"))


def layer_report(qstate: QuantState) -> list[dict]:
  """One JSON-able row per quantized layer.

  Keys: path, module_type, weight_format, weight_maxval_min/max/mean (over output channels), weight_mse,
  act_format, act_sign ("signed" / "unsigned"), act_maxval, act_zero_point (None when signed), act_min/max
  (observed), one_sided, act_mse, and for MatMul layers the same rhs_act_* keys for the second operand. A
  split input (shortcut splitting) has act_split (the first part's channel count) and the same skip_act_*
  keys (with skip_act_min/max, skip_one_sided) for the skip part; act_* then describe the first part.
  """
  rows = []
  for path, layer in qstate.layers.items():
    row = {"path": path, "module_type": layer.module_type,
           "weight_format": None if layer.weight_format is None else layer.weight_format.name,
           "weight_mse": layer.weight_mse}
    if layer.weight_maxval is not None:
      maxval = np.asarray(layer.weight_maxval, np.float64)
      row.update(weight_maxval_min=float(maxval.min()), weight_maxval_max=float(maxval.max()),
                 weight_maxval_mean=float(maxval.mean()))
    for prefix in ("act", "rhs_act", "skip_act"):
      fmt = getattr(layer, f"{prefix}_format")
      if fmt is None:
        continue
      zero_point = getattr(layer, f"{prefix}_zero_point")
      row.update({f"{prefix}_format": fmt.name, f"{prefix}_sign": "signed" if fmt.signed else "unsigned",
                  f"{prefix}_maxval": float(np.asarray(getattr(layer, f"{prefix}_maxval"))),
                  f"{prefix}_zero_point": None if zero_point is None else float(np.asarray(zero_point)),
                  f"{prefix}_mse": getattr(layer, f"{prefix}_mse")})
    row.update(act_min=layer.act_range[0], act_max=layer.act_range[1], one_sided=layer.one_sided)
    if layer.act_split is not None:
      row.update(act_split=layer.act_split, skip_act_min=layer.skip_act_range[0],
                 skip_act_max=layer.skip_act_range[1], skip_one_sided=layer.skip_one_sided)
    rows.append(row)
  return rows


def _cell(value) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def format_report_table(rows: Sequence[dict]) -> str:
  """A fixed-width text table of layer_report rows."""
  header = [title for title, _ in _COLUMNS]
  body = []
  for row in rows:
    if row.get("act_split") is None:
      body.append([_cell(row.get(key)) for _, key in _COLUMNS])
      continue
    # A split input: one line per part, the layer's columns on the first.
    first = dict(row, path=f"{row['path']} [:{row['act_split']}]")
    skip = {key: row.get("skip_" + key) for _, key in _COLUMNS if key.startswith("act_")}
    skip["path"] = f"{row['path']} [{row['act_split']}:] skip"
    body += [[_cell(first.get(key)) for _, key in _COLUMNS], [_cell(skip.get(key)) for _, key in _COLUMNS]]
  widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
  lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
           "  ".join("-" * w for w in widths)]
  lines += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in body]
  unsigned = sum(1 for row in rows if row.get("act_sign") == "unsigned")
  split = sum(1 for row in rows if row.get("act_split") is not None)
  lines.append(f"{len(rows)} quantized layers, {unsigned} with unsigned activation formats"
               + (f", {split} with split inputs (one quantizer per concatenated part)" if split else ""))
  return "\n".join(lines)


def print_report(qstate: QuantState) -> str:
  """Prints (and returns) the per-layer table."""
  table = format_report_table(layer_report(qstate))
  print(table)
  return table


def save_report_json(qstate: QuantState, path: str | os.PathLike) -> list[dict]:
  """Writes the per-layer rows (plus the state's kind and FP-kept layers) as JSON; returns the rows."""
  rows = layer_report(qstate)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    json.dump({"kind": qstate.kind, "unquantized": list(qstate.unquantized), "layers": rows}, f, indent=1)
  return rows


def default_histogram_layers(qstate: QuantState, max_layers: int = 6) -> list[str]:
  """Up to max_layers paths: half one-sided (SiLU-fed) inputs, half the others, in model order."""
  one_sided = [p for p, layer in qstate.layers.items() if layer.one_sided]
  others = [p for p, layer in qstate.layers.items() if not layer.one_sided]
  half = max_layers // 2
  chosen = one_sided[:max(half, max_layers - len(others))]
  chosen += others[:max_layers - len(chosen)]
  order = list(qstate.layers)
  return sorted(chosen, key=order.index)


def plot_activation_histograms(qstate: QuantState, statistics, path: str | os.PathLike, *,
                               layers: Sequence[str] | None = None, max_layers: int = 6, bins: int = 200) -> str:
  """Saves a PNG with one panel per layer: the calibration samples' histogram and the chosen grid over it.

  Args:
    qstate: the calibrated state (formats, maxvals, zero points).
    statistics: the CalibrationStatistics of the same calibration (calibrate(..., return_statistics=True)).
    path: the PNG to write.
    layers: paths to plot; default: a few one-sided (SiLU-fed) and a few other layers.
  Returns:
    The PNG path.
  """
  plt = plotting.pyplot()

  layers = list(layers) if layers is not None else default_histogram_layers(qstate, max_layers)
  unknown = [p for p in layers if p not in qstate.layers or p not in statistics.activations]
  if unknown:
    raise ValueError(f"no calibrated activation for layers {unknown}; quantized layers: {list(qstate.layers)}")
  if not layers:
    raise ValueError("no layers to plot")
  cols = min(3, len(layers))
  rows = (len(layers) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
  for ax, layer_path in zip(axes.ravel(), layers):
    layer = qstate.layers[layer_path]
    samples = statistics.activations[layer_path][0].samples
    zero_point = 0.0 if layer.act_zero_point is None else float(np.asarray(layer.act_zero_point))
    grid = zero_point + layer.act_format.grid(float(np.asarray(layer.act_maxval)))
    ax.hist(samples, bins=bins, density=True, color="0.6", log=True)
    for level in grid:
      ax.axvline(level, color="tab:red", linewidth=0.6, alpha=0.8)
    sign = "signed" if layer.act_format.signed else f"unsigned, z={zero_point:.3g}"
    kind = "one-sided" if layer.one_sided else "two-sided"
    ax.set_title(f"{layer_path}\n{layer.act_format.name} ({sign}), {kind} input", fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in axes.ravel()[len(layers):]:
    ax.axis("off")
  fig.suptitle("layer inputs at calibration (grey) and the chosen quantization grid (red)", fontsize=9)
  return plotting.save_figure(fig, path)


def write_report(directory: str | os.PathLike, qstate: QuantState, statistics=None) -> dict[str, str]:
  """Writes DIRECTORY/quant_report.txt, quant_report.json and, with statistics, activation_histograms.png."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  table = format_report_table(layer_report(qstate))
  (directory / "quant_report.txt").write_text(table + "\n")
  files = {"table": str(directory / "quant_report.txt"), "json": str(directory / "quant_report.json")}
  save_report_json(qstate, directory / "quant_report.json")
  if statistics is not None:
    files["histograms"] = plot_activation_histograms(qstate, statistics, directory / "activation_histograms.png")
  return files
