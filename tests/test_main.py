"""The command-line contract: --mode=finetune calibrates when needed, logs metrics.jsonl, resumes with larger N."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "train"))
import tiny_setup  # noqa: E402

SMALL = ["--config.sampler.num_steps=4", "--config.calibration.num_samples=8", "--config.calibration.batch_size=8",
         "--config.calibration.num_timesteps=2", "--config.lora.num_banks=2", "--config.lora.rank=2",
         "--config.lora.router_embed_dim=8", "--config.lora.router_hidden_dim=8", "--config.finetune.batch_size=8",
         "--config.finetune.log_every=1"]


def _main(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "msfp_jax.main", *args], cwd=cwd, capture_output=True, text=True,
                        timeout=900, env=dict(os.environ))


def test_finetune_mode_contract(tmp_path):
  model_dir = tiny_setup.write_tiny_model(tmp_path / "model")
  workdir = tmp_path / "run"
  common = ["--config=configs/default.py", "--mode=finetune", f"--workdir={workdir}",
            f"--config.model.path={model_dir}", *SMALL, "--config.finetune.checkpoint_every=2"]
  first = _main(*common, "--config.finetune.num_steps=2")
  assert first.returncode == 0, first.stderr[-3000:]
  assert (workdir / "calibration_summary.json").is_file(), "finetune must calibrate first when W has none"
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2] and all("loss" in r for r in records)
  second = _main(*common, "--config.finetune.num_steps=3")
  assert second.returncode == 0, second.stderr[-3000:]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3], "a larger N resumes from the last checkpoint"


def test_bad_command_lines_fail_clearly(tmp_path):
  out = _main("--config=configs/default.py", "--mode=nosuchmode", f"--workdir={tmp_path}")
  assert out.returncode != 0 and "Unknown --mode" in out.stderr
  out = _main("--config=configs/default.py", "--mode=finetune", f"--workdir={tmp_path}",
              "--config.finetune.no_such_field=3")
  assert out.returncode != 0 and "no_such_field" in out.stderr
