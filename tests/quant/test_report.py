"""The per-layer report: table, JSON and activation-histogram PNG agree with the QuantState."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from msfp_jax.quant import (
  QuantConfig,
  calibrate,
  format_report_table,
  layer_report,
  plot_activation_histograms,
  print_report,
  save_report_json,
  write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(32, name="dense1", kernel_init=nn.initializers.normal(1.0))(x)
    h = nn.Dense(32, name="dense2")(nn.silu(h))
    return nn.Dense(4, name="dense3")(h)


@pytest.fixture(scope="module")
def calibrated():
  model = Net()
  x = jax.random.normal(jax.random.key(0), (128, 8))
  variables = model.init(jax.random.key(1), x)
  return calibrate(model, variables, [(x[:64],), (x[64:],)], QuantConfig(), return_statistics=True)


def test_rows_match_the_state(calibrated):
  qstate, _ = calibrated
  rows = layer_report(qstate)
  assert [row["path"] for row in rows] == list(qstate.layers)
  for row in rows:
    layer = qstate.layers[row["path"]]
    assert row["weight_format"] == layer.weight_format.name
    assert row["act_format"] == layer.act_format.name
    assert row["act_sign"] == ("signed" if layer.act_format.signed else "unsigned")
    assert row["act_maxval"] == pytest.approx(float(layer.act_maxval))
    assert row["weight_maxval_max"] == pytest.approx(float(np.max(layer.weight_maxval)))
    assert row["act_mse"] == layer.act_mse and row["weight_mse"] == layer.weight_mse
    if layer.act_zero_point is None:
      assert row["act_zero_point"] is None
    else:
      assert row["act_zero_point"] == pytest.approx(float(layer.act_zero_point))
  # The SiLU-fed layer is one-sided; its unsigned choice and zero point appear in the report.
  by_path = {row["path"]: row for row in rows}
  assert by_path["dense2"]["one_sided"] and by_path["dense2"]["act_sign"] == "unsigned"
  assert by_path["dense2"]["act_zero_point"] < 0


def test_table_is_printed_and_json_saved(calibrated, tmp_path, capsys):
  qstate, _ = calibrated
  table = print_report(qstate)
  assert table in capsys.readouterr().out
  lines = table.splitlines()
  assert lines[0].split()[:5] == ["path", "type", "weight", "w_mse", "act"]
  assert any(line.startswith("dense2") and "unsigned" in line for line in lines)
  assert lines[-1] == "3 quantized layers, 1 with unsigned activation formats"
  assert format_report_table(layer_report(qstate)) == table
  rows = save_report_json(qstate, tmp_path / "r" / "report.json")
  saved = json.loads((tmp_path / "r" / "report.json").read_text())
  assert saved["kind"] == "fp" and saved["layers"] == json.loads(json.dumps(rows))


def test_histogram_png_and_write_report(calibrated, tmp_path):
  qstate, statistics = calibrated
  png = plot_activation_histograms(qstate, statistics, tmp_path / "h.png", layers=["dense2", "dense3"])
  data = open(png, "rb").read()
  assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
  files = write_report(tmp_path / "all", qstate, statistics)
  assert set(files) == {"table", "json", "histograms"}
  assert open(files["histograms"], "rb").read().startswith(PNG_SIGNATURE)
  with pytest.raises(ValueError, match="no calibrated activation"):
    plot_activation_histograms(qstate, statistics, tmp_path / "x.png", layers=["nope"])
