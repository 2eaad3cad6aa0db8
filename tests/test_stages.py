"""The main job end to end on the tiny model, module-scoped: `--mode=finetune` on the command line, then the
rest of the job in this process (`msfp_jax.run.run_job`, as flax's examples' train_test.py runs
train_and_evaluate) on the same workdir, which must accept the command line's config record; then cheap reruns
on the command line (which must find every stage of the in-process run current).

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

FINETUNE_STEPS = 3
SMALL = tiny_setup.tiny_flags(**{"finetune.num_steps": FINETUNE_STEPS})
MODELS = ("fp", "ptq", "finetuned")
NUM_BANKS = tiny_setup.TINY_OVERRIDES["lora.num_banks"]
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


def _in_process_config(model_dir, root, fid_torchscript_path, **overrides):
  """The command line's config (SMALL over configs/default.py, the config's own learning rates), in this process."""
  from msfp_jax.configs import default
  rates = default.get_config().finetune.lr
  return tiny_setup.tiny_config(model_dir, **{
      **{key: rates[key.rsplit(".", 1)[1]] for key in tiny_setup.TINY_LEARNING_RATES},
      "finetune.num_steps": FINETUNE_STEPS, "evaluation.reference": str(root / "reference_stats.npz"),
      "evaluation.inception": str(fid_torchscript_path), **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory, fid_torchscript_path):
  from msfp_jax import run as run_lib
  root = tmp_path_factory.mktemp("stages")
  model_dir = tiny_setup.write_tiny_model(root / "model")
  reference = root / "reference_stats.npz"
  _write_reference_statistics(reference)
  workdir = root / "run"
  common = ["--config=configs/default.py", f"--workdir={workdir}", f"--config.model.path={model_dir}", *SMALL,
            f"--config.evaluation.reference={reference}", f"--config.evaluation.inception={fid_torchscript_path}"]
  # The fine-tuning mode alone first, on the command line (its contract: test_finetune_mode_contract); the whole
  # job then runs in this process, finds calibration and fine-tuning done, and runs the rest.
  finetuned = _main(*common, "--mode=finetune")
  assert finetuned.returncode == 0, finetuned.stdout[-2000:] + finetuned.stderr[-4000:]
  after_finetune = {"calibrated": (workdir / "calibration_summary.json").is_file(),
                    "records": [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()],
                    "sampled": (workdir / "samples").exists(),
                    "mtimes": {name: (workdir / name).stat().st_mtime_ns
                               for name in ("calibration_summary.json", "metrics.jsonl")}}
  run_lib.run_job(_in_process_config(model_dir, root, fid_torchscript_path), workdir, "all")
  return {"workdir": workdir, "common": common, "model_dir": model_dir, "root": root,
          "after_finetune": after_finetune}


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
  assert q["finetune_steps"] == FINETUNE_STEPS and report["stale"] == {}
  assert report["protocol"]["steps"] == 4 and report["protocol"]["model"] == str(run["model_dir"])
  markdown = (workdir / "report.md").read_text()
  for name in MODELS:
    assert f"| {name} |" in markdown
  assert "W4A4" in markdown


def test_finetune_mode_contract(run):
  """--mode=finetune on a workdir without calibration calibrates first, logs every step, and runs nothing else."""
  after = run["after_finetune"]
  assert after["calibrated"], "finetune must calibrate first when the workdir has none"
  assert [r["step"] for r in after["records"]] == list(range(1, FINETUNE_STEPS + 1))
  assert all("loss" in r for r in after["records"])
  assert not after["sampled"], "--mode=finetune runs calibration and fine-tuning only"
  assert {name: (run["workdir"] / name).stat().st_mtime_ns for name in after["mtimes"]} == after["mtimes"], \
      "the whole job then skips what --mode=finetune did"


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

  from msfp_jax.quant import packed
  from msfp_jax.run import export
  from msfp_jax.train import pipeline

  workdir = run["workdir"]
  summary = _json(workdir / "export" / "summary.json")
  assert summary["max_abs_diff_packed_vs_fake_quant_samples"] == 0
  # On codes with folded biases: only float summation order differs (the zero points are on the grid and the
  # test config does not train them), samples in [-1, 1].
  assert summary["max_abs_diff_code_domain_vs_fake_quant_samples"] < 1e-3
  assert summary["noise_nudge"] == 1e-6 and np.isfinite(summary["max_abs_diff_fake_quant_nudged_noise_samples"])
  assert summary["num_banks"] == NUM_BANKS and summary["bytes_one_bank"] < summary["fp_checkpoint_bytes"]
  path = workdir / "export" / "model_packed.npz"
  loaded = packed.load_packed(path)
  assert len(loaded.variables_per_bank) == NUM_BANKS
  # Independently of the export stage: sampling from the file with the sample stage's noise gives the
  # fine-tuned samples that stage saved (from the fake-quantized model).
  config = tiny_setup.tiny_config(run["model_dir"])
  bundle = pipeline.load_model(config)
  x_T, labels = pipeline.noise_batch(int(config.seed), pipeline.NoisePurpose.SAMPLE, 0, 4, bundle.sample_shape,
                                     bundle.num_classes)
  images = export.sample_from_packed(loaded, bundle, pipeline.schedule_from(config), pipeline.sampler_from(config),
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


# ------------------------------------------------------------------------ results follow their inputs (no stale)
def _copy_run(run, tmp_path):
  """A copy of the module's finished run (the tests below change it), with the command line pointing at it."""
  import shutil
  workdir = tmp_path / "run"
  shutil.copytree(run["workdir"], workdir, symlinks=True)
  return workdir, [a for a in run["common"] if not a.startswith("--workdir=")] + [f"--workdir={workdir}"]


def _config_of(run, fid_torchscript_path, **overrides):
  """The module run's config, in this process."""
  return _in_process_config(run["model_dir"], run["root"], fid_torchscript_path, **overrides)


def test_extending_finetuning_recomputes_what_depends_on_it(run, tmp_path):
  workdir, common = _copy_run(run, tmp_path)
  before = {"eval": _json(workdir / "eval_summary.json"), "samples": _json(workdir / "samples" / "summary.json"),
            "report": _json(workdir / "report.json")}
  unchanged = [workdir / "eval" / "fp" / "results.json", workdir / "eval" / "ptq" / "results.json",
               workdir / "samples" / "fp.npz", workdir / "samples" / "ptq.npz"]
  mtimes = {p: p.stat().st_mtime_ns for p in unchanged}
  records_before = (workdir / "metrics.jsonl").read_text().splitlines()
  out = _main(*common, "--config.finetune.num_steps=4")
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  assert "finetune_step 3 -> 4" in out.stdout, out.stdout[-3000:]
  # A larger N resumes from the last checkpoint: the logged steps go on, each once (test_main's old contract).
  records = (workdir / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in records] == [1, 2, 3, 4] and records[:3] == records_before
  evals = _json(workdir / "eval_summary.json")
  assert before["eval"]["finetuned"]["inputs"]["finetune_step"] == 3
  assert evals["finetuned"]["inputs"]["finetune_step"] == 4
  assert evals["finetuned"]["metrics"]["fid"] != before["eval"]["finetuned"]["metrics"]["fid"]
  # The FP and PTQ models did not change: their samples and scores are kept, not recomputed.
  assert evals["fp"] == before["eval"]["fp"] and evals["ptq"] == before["eval"]["ptq"]
  assert {p: p.stat().st_mtime_ns for p in unchanged} == mtimes
  samples = _json(workdir / "samples" / "summary.json")
  assert samples["inputs"]["finetuned"]["finetune_step"] == 4
  assert samples["sample_mse_vs_fp"]["finetuned"] != before["samples"]["sample_mse_vs_fp"]["finetuned"]
  export = _json(workdir / "export" / "summary.json")
  assert export["inputs"]["finetune_step"] == 4 and export["max_abs_diff_packed_vs_fake_quant_samples"] == 0
  report = _json(workdir / "report.json")
  assert report["quantization"]["finetune_steps"] == 4 and report["stale"] == {}
  assert report["finetuned"]["fid"] == evals["finetuned"]["metrics"]["fid"] != before["report"]["finetuned"]["fid"]
  assert report["finetuned"]["sample_mse_vs_fp"] == samples["sample_mse_vs_fp"]["finetuned"]


def test_report_never_shows_scores_beside_another_protocol(run, tmp_path, fid_torchscript_path):
  from msfp_jax.run import report
  workdir, _ = _copy_run(run, tmp_path)
  same = report.run_report(_config_of(run, fid_torchscript_path), workdir)
  assert same["stale"] == {} and all(isinstance(same[name].get("fid"), float) for name in MODELS), same["stale"]
  changed = report.run_report(_config_of(run, fid_torchscript_path, **{"evaluation.num_samples": 6}), workdir)
  assert changed["protocol"]["eval_samples"] == 6
  for name in MODELS:
    assert "fid" not in changed[name] and "protocol" not in changed[name], changed[name]
    assert "evaluation.num_samples 4 -> 6" in changed["stale"][f"eval {name}"]
    # Samples do not depend on the evaluation protocol: still reported.
    assert changed[name]["sample_mse_vs_fp"] == same[name]["sample_mse_vs_fp"]
  markdown = (workdir / "report.md").read_text()
  assert "Scores:" not in markdown and "Left out" in markdown and "evaluation.num_samples 4 -> 6" in markdown
  assert "| finetuned | n/a | n/a |" in markdown


def test_eval_recomputes_exactly_the_results_whose_inputs_changed(tmp_path, monkeypatch, capsys):
  from msfp_jax import evaluation
  from msfp_jax.run import evaluate
  from msfp_jax.run import models as models_lib
  model_dir = tiny_setup.write_tiny_model(tmp_path / "model")
  inception = tmp_path / "inception.pt"
  inception.write_bytes(b"stands for the FID network")
  workdir = tmp_path / "run"
  calls = []

  def fake_evaluate(sample_fn, num_samples, workdir, *, name, protocol, **kwargs):
    del sample_fn, kwargs
    calls.append(name)
    (pathlib.Path(workdir) / "eval" / name / f"round_of_call_{len(calls)}").write_text("")
    return {"metrics": {"fid": float(len(calls))}, "protocol": {**protocol, "num_samples": num_samples}}
  monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
  monkeypatch.setattr(evaluation, "load_inception", lambda path: object())
  monkeypatch.setattr(evaluate, "reference_statistics", lambda config, workdir, inception: (None, "reference"))
  monkeypatch.setattr(models_lib.Models, "sample_fn", lambda self, name: None)
  monkeypatch.setattr(models_lib.Models, "eval_labels", lambda self, num_samples, seed: None)  # unconditional
  models = object.__new__(models_lib.Models)

  def eval_with(**overrides):
    calls.clear()
    config = tiny_setup.tiny_config(model_dir, **{"evaluation.inception": str(inception), **overrides})
    return evaluate.run_eval(config, workdir, models)
  eval_with(**{"evaluation.num_samples": 4})
  assert calls == list(MODELS)
  eval_with(**{"evaluation.num_samples": 4})
  assert calls == [], "a current result is reused"
  capsys.readouterr()
  summary = eval_with(**{"evaluation.num_samples": 6})
  assert calls == list(MODELS), "another protocol: every model is scored again"
  assert "evaluation.num_samples 4 -> 6" in capsys.readouterr().out
  assert all(summary[name]["inputs"]["evaluation.num_samples"] == 6 for name in MODELS)
  assert [p.name for p in (workdir / "eval" / "fp").glob("round_*")] == ["round_of_call_1"], \
      "rounds computed from other inputs are deleted first"
  # An interrupted evaluation of the same inputs resumes: its rounds are kept.
  saved = _json(workdir / "eval_summary.json")
  del saved["ptq"]
  (workdir / "eval_summary.json").write_text(json.dumps(saved))
  eval_with(**{"evaluation.num_samples": 6})
  assert calls == ["ptq"]
  assert sorted(p.name for p in (workdir / "eval" / "ptq").glob("round_*")) == ["round_of_call_1", "round_of_call_2"]
  # The inputs are the files' contents, not their names: another network file is another protocol.
  inception.write_bytes(b"another network")
  eval_with(**{"evaluation.num_samples": 6})
  assert calls == list(MODELS)


# ------------------------------------------------------------------------------------------ a read-only workdir
def _read_only(path: pathlib.Path):
  """`path` bind-mounted read-only onto itself (a real read-only file system); skips where mounting is refused."""
  import contextlib
  import shutil

  @contextlib.contextmanager
  def mounted():
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
      pytest.skip("a read-only bind mount needs root and mount(8)")
    if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode:
      pytest.skip("mount --bind is refused here")
    try:
      if subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode:
        pytest.skip("a read-only remount is refused here")
      yield path
    finally:
      subprocess.run(["umount", str(path)], capture_output=True)
  return mounted()


def test_unfinished_names_what_a_run_would_still_compute(run, tmp_path, fid_torchscript_path):
  from msfp_jax.run import report
  workdir, _ = _copy_run(run, tmp_path)
  config = _config_of(run, fid_torchscript_path)
  report_json = (workdir / "report.json").read_text()
  assert report.unfinished(config, workdir, report.run_report(config, workdir, write=False)) == []
  longer = _config_of(run, fid_torchscript_path, **{"finetune.num_steps": 5})
  assert report.unfinished(longer, workdir, report.run_report(longer, workdir, write=False)) == [
      "fine-tuned to step 3 of 5"]
  other = _config_of(run, fid_torchscript_path, **{"evaluation.num_samples": 6})
  missing = report.unfinished(other, workdir, report.run_report(other, workdir, write=False))
  assert len(missing) == 3 and all("evaluation.num_samples 4 -> 6" in m for m in missing), missing
  (workdir / "export" / "summary.json").unlink()
  assert report.unfinished(config, workdir, report.run_report(config, workdir, write=False)) == ["no export"]
  assert (workdir / "report.json").read_text() == report_json, "run_report(write=False) writes nothing"


def test_read_only_workdir_of_a_finished_run_prints_its_report(run, tmp_path):
  workdir, common = _copy_run(run, tmp_path)
  report_md = (workdir / "report.md").read_text()
  with _read_only(workdir):
    with pytest.raises(OSError):
      (workdir / "probe").write_text("")
    out = _main(*common)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert report_md.strip() in out.stdout, "the report of the finished run, computed without writing"
    assert "Traceback" not in out.stderr and "is read-only" in out.stderr, out.stderr[-2000:]
    assert "== stage" not in out.stdout
    out = _main(*common, "--mode=finetune")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "is not writable" in lines[0], out.stderr[-2000:]
    assert "--mode=finetune writes its results there" in lines[0]
