"""The main job end to end on the tiny model: one full `--mode=all` run (module-scoped), then cheap reruns.

References: the saved samples (sample MSE recomputed here with numpy), the packed file sampled again in this
process against the fine-tuned samples the sample stage saved, PIL for the PNGs, and the real FID network
(fid_torchscript_path) for the scores.
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "train"))
import tiny_setup  # noqa: E402

# Same tiny budgets as tests/test_main.py; evaluation is one round of 4 images per model.
SMALL = ["--config.sampler.num_steps=4", "--config.calibration.num_samples=8", "--config.calibration.batch_size=8",
         "--config.calibration.num_timesteps=2", "--config.lora.num_banks=2", "--config.lora.rank=2",
         "--config.lora.router_embed_dim=8", "--config.lora.router_hidden_dim=8", "--config.finetune.batch_size=8",
         "--config.finetune.log_every=1", "--config.finetune.num_steps=3", "--config.sample.num_images=4",
         "--config.evaluation.num_samples=4", "--config.evaluation.batch_size=4"]
MODELS = ("fp", "ptq", "finetuned")
NUM_BANKS = 2
PROTOCOL_KEYS = ("model_checkpoint_sha256", "sampler", "steps", "eta", "guidance", "seed", "pipeline",
                 "inception_weights_sha256", "reference_statistics_sha256")


def _main(*args):
  return subprocess.run([sys.executable, "-m", "msfp_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=1200, env=dict(os.environ))


def _write_reference_statistics(path: pathlib.Path) -> None:
  """ADM-layout reference statistics (mu, sigma, mu_s, sigma_s) with random PSD covariances.

  Statistics instead of reference images keep the test from pushing a padded 50-image batch through Inception.
  """
  rng = np.random.default_rng(0)

  def moments(dim):
    factor = rng.normal(size=(dim, 16))
    return rng.normal(size=dim) * 0.1, factor @ factor.T / 16

  mu, sigma = moments(2048)
  mu_s, sigma_s = moments(2023)
  np.savez(path, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)


@pytest.fixture(scope="module")
def run(tmp_path_factory, fid_torchscript_path):
  root = tmp_path_factory.mktemp("stages")
  model_dir = tiny_setup.write_tiny_model(root / "model")
  reference = root / "reference_stats.npz"
  _write_reference_statistics(reference)
  workdir = root / "run"
  common = ["--config=configs/default.py", f"--workdir={workdir}", f"--config.model.path={model_dir}", *SMALL,
            f"--config.evaluation.reference={reference}", f"--config.evaluation.inception={fid_torchscript_path}"]
  out = _main(*common)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
  return {"workdir": workdir, "common": common, "model_dir": model_dir, "root": root, "stdout": out.stdout}


def _json(path):
  return json.loads(pathlib.Path(path).read_text())


def test_report_scores_every_model(run):
  workdir = run["workdir"]
  report = _json(workdir / "report.json")
  assert set(MODELS) <= set(report) and "protocol" in report and "quantization" in report
  samples = {name: np.load(workdir / "samples" / f"{name}.npz")["images"] for name in MODELS}
  assert report["fp"]["sample_mse_vs_fp"] == 0.0
  for name in ("ptq", "finetuned"):
    expected = float(np.mean((samples[name].astype(np.float64) - samples["fp"]) ** 2))
    assert report[name]["sample_mse_vs_fp"] > 0
    assert report[name]["sample_mse_vs_fp"] == pytest.approx(expected, rel=1e-5)
  for name in MODELS:
    for metric in ("fid", "sfid"):
      value = report[name].get(metric)
      assert isinstance(value, float) and math.isfinite(value) and value >= 0, (name, metric, report[name])
  q = report["quantization"]
  assert (q["weight_bits"], q["act_bits"], q["lora_banks"]) == (4, 4, NUM_BANKS)
  assert q["num_quantized_layers"] > 0 and q["layer_format_counts"]
  assert report["protocol"]["steps"] == 4 and report["protocol"]["model"] == str(run["model_dir"])
  markdown = (workdir / "report.md").read_text()
  for name in MODELS:
    assert f"| {name} |" in markdown
  assert "W4A4" in markdown


def test_eval_results_carry_the_protocol(run):
  workdir = run["workdir"]
  evals = _json(workdir / "eval_summary.json")
  hashes = set()
  for name in MODELS:
    protocol = evals[name]["protocol"]
    for key in PROTOCOL_KEYS:
      assert protocol.get(key) is not None, (name, key, protocol)
    assert (protocol["sampler"], protocol["steps"], protocol["num_samples"]) == ("ddim", 4, 4)
    hashes.add((protocol["model_checkpoint_sha256"], protocol["inception_weights_sha256"],
                protocol["reference_statistics_sha256"]))
    assert (workdir / "eval" / name / "results.json").is_file()
  assert len(hashes) == 1, "the three models are scored under one protocol"


def test_pngs_are_written(run):
  from PIL import Image
  for name in ("samples_side_by_side.png", "router_allocation.png"):
    path = run["workdir"] / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    with Image.open(path) as image:
      image.load()
      assert image.width > 100 and image.height > 100


def test_packed_export_reproduces_the_finetuned_samples(run):
  import jax
  from msfp_jax import stages
  from msfp_jax.quant import packed
  from msfp_jax.train import pipeline

  workdir = run["workdir"]
  summary = _json(workdir / "export" / "summary.json")
  assert summary["max_abs_diff_packed_vs_fake_quant_samples"] == 0
  assert summary["num_banks"] == NUM_BANKS and summary["bytes_one_bank"] < summary["fp_checkpoint_bytes"]
  path = workdir / "export" / "model_packed.npz"
  loaded = packed.load_packed(path)
  assert len(loaded.variables_per_bank) == NUM_BANKS
  # Independently of the export stage: sampling from the file with the sample stage's noise gives the
  # fine-tuned samples that stage saved (written by another process, from the fake-quantized model).
  config = tiny_setup.tiny_config(run["model_dir"], **{"lora.num_banks": NUM_BANKS, "sample.num_images": 4})
  bundle = pipeline.load_model(config)
  x_T, labels = pipeline.noise_batch(int(config.seed), stages.NOISE_SAMPLE, 0, 4, bundle.sample_shape,
                                     bundle.num_classes)
  images = stages.sample_from_packed(loaded, bundle, pipeline.schedule_from(config), pipeline.sampler_from(config),
                                     x_T, labels, jax.random.key(int(config.seed)))
  saved = np.load(workdir / "samples" / "finetuned.npz")["images"]
  np.testing.assert_allclose(np.clip(images, -1, 1), saved, atol=1e-5)


def test_rerun_recomputes_nothing(run):
  workdir = run["workdir"]
  results = [workdir / "calibration_summary.json", workdir / "metrics.jsonl", workdir / "samples" / "summary.json",
             workdir / "eval_summary.json", *(workdir / "eval" / name / "results.json" for name in MODELS),
             workdir / "export" / "summary.json", workdir / "export" / "model_packed.npz"]
  before = {p: p.stat().st_mtime_ns for p in results}
  out = _main(*run["common"])
  assert out.returncode == 0, out.stderr[-3000:]
  assert {p: p.stat().st_mtime_ns for p in results} == before
  assert "round 1/" not in out.stdout, "no evaluation round may run again"
  assert (workdir / "report.json").is_file()


def test_workdir_of_another_quant_config_is_refused(run):
  out = _main(*run["common"], "--config.quant.act_bits=8")
  assert out.returncode != 0
  assert "quant.act_bits" in out.stderr, out.stderr[-2000:]


def test_export_without_finetuning_fails_clearly(run, tmp_path):
  common = [a for a in run["common"] if not a.startswith("--workdir=")]
  out = _main(*common, f"--workdir={tmp_path / 'fresh'}", "--mode=export")
  assert out.returncode != 0
  assert "fine-tun" in out.stderr and "--mode=finetune" in out.stderr, out.stderr[-2000:]
