"""docs/quickstart.ipynb runs top to bottom in a fresh python3 kernel (on a tiny model, from the repository root)
and ends with the side-by-side sample grid and the per-layer format table."""
import base64
import os
import pathlib
import sys

import nbclient
import nbformat

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "train"))
import tiny_setup  # noqa: E402

NOTEBOOK = REPO / "docs" / "quickstart.ipynb"


def _text(cell) -> str:
  parts = []
  for output in cell.get("outputs", []):
    if output.get("output_type") == "stream":
      parts.append(output["text"])
    elif "data" in output and "text/plain" in output["data"]:
      parts.append(output["data"]["text/plain"])
  return "".join(parts)


def test_saved_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_quickstart_runs(tmp_path, monkeypatch):
  from PIL import Image
  model_dir = tiny_setup.write_tiny_model(tmp_path / "model")
  workdir = tmp_path / "work"
  monkeypatch.setenv("MSFP_QUICKSTART_MODEL", str(model_dir))
  monkeypatch.setenv("MSFP_QUICKSTART_WORKDIR", str(workdir))
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  # A failing cell raises CellExecutionError (with the cell's traceback), failing the test.
  nbclient.NotebookClient(notebook, kernel_name="python3", timeout=600,
                          resources={"metadata": {"path": str(REPO)}}).execute(env=dict(os.environ))
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert all(output.get("output_type") != "error" for cell in code for output in cell.outputs)
  assert str(model_dir) in "".join(_text(cell) for cell in code), "the notebook loads MSFP_QUICKSTART_MODEL"

  # The sampling cell shows the grid it wrote, as an inline PNG.
  grid = workdir / "samples_side_by_side.png"
  assert grid.is_file()
  pngs = [output["data"]["image/png"] for cell in code for output in cell.outputs
          if output.get("output_type") == "display_data" and "image/png" in output.get("data", {})]
  assert len(pngs) == 1 and base64.b64decode(pngs[0]) == grid.read_bytes()
  with Image.open(grid) as image:
    assert image.width > 100 and image.height > 100
  assert "sample MSE vs FP" in _text(code[-2])

  # The last cell prints the per-layer format table of the calibration it made: one row per quantized layer.
  table = _text(code[-1])
  from msfp_jax.train import calibration
  qstate = calibration.load_calibration(workdir)
  assert f"{len(qstate.layers)} quantized layers" in table
  for path, layer in qstate.layers.items():
    row = next(line for line in table.splitlines() if line.startswith(path + " "))
    assert layer.act_format.name in row.split()
