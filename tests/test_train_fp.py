"""End to end: train_fp's runlocal variant for 2 steps, export, resume, bad resume."""
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from msfp_jax import checkpoint, train_fp
from msfp_jax.configs import cifar10_fp, default_fp
from msfp_jax.models import load

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "train"))
import fakes  # noqa: E402


def runlocal(**train_overrides):
  config = default_fp.get_config("runlocal")
  config.train.update(train_overrides)
  return config


def test_runlocal_two_steps_end_to_end(tmp_path):
  data_dir = tmp_path / "tfds"
  config = runlocal()
  config.data.data_dir = str(data_dir)
  result = train_fp.train_and_evaluate(config, tmp_path / "run")
  run = tmp_path / "run"
  assert result["final_step"] == 2 and np.isfinite(result["final_loss"]) and result["samples_finite"]
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == [1, 2]
  assert (run / "samples.png").is_file() and (run / "data.png").is_file()
  assert list((run / "tensorboard").iterdir()), "TensorBoard events are written"
  # The exported EMA model loads through the models registry and runs.
  model, variables, meta = load(run / "model")
  assert meta["schedule"]["kind"] == "linear" and meta["data"] == "digits16"
  x = np.zeros((2, 16, 16, 1), np.float32)
  assert model.apply(variables, x, np.array([0, 999], np.int32)).shape == (2, 16, 16, 1)
  state, saved_config = checkpoint.CheckpointManager(run / "checkpoints").restore()
  assert int(state["step"]) == 2 and saved_config["train"]["batch_size"] == 4
  jax.tree.map(np.testing.assert_array_equal, variables["params"], state["ema_params"])

  # Resume: 1 step, then on to 2 in the same workdir, ends where the uninterrupted run ended.
  for steps in (1, 2):
    config = runlocal(num_steps=steps)
    config.data.data_dir = str(data_dir)
    config.sample.num_samples = 0
    train_fp.train_and_evaluate(config, tmp_path / "resumed")
  resumed, _ = checkpoint.CheckpointManager(tmp_path / "resumed" / "checkpoints").restore(2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), resumed["params"],
               state["params"])

  # Resuming with another model or optimizer config is one clear error.
  config = runlocal(num_steps=3, learning_rate=0.5)
  config.data.data_dir = str(data_dir)
  with pytest.raises(checkpoint.CheckpointError, match="different config"):
    train_fp.train_and_evaluate(config, tmp_path / "resumed")


def test_cifar10_from_the_fixture_archive_and_resume_refused_naming_the_fields(tmp_path):
  fixture = pathlib.Path(__file__).resolve().parent / "fixtures" / "cifar10-jpeg-mini.tar.xz"
  config = cifar10_fp.get_config("runlocal")
  config.data.archive = str(fixture)
  config.data.data_dir = str(tmp_path / "tfds")
  result = train_fp.train_and_evaluate(config, tmp_path / "run")
  assert result["final_step"] == 2 and result["images_seen"] == 8 and result["samples_finite"]
  model, variables, meta = load(tmp_path / "run" / "model")
  assert meta["data"] == "cifar10" and meta["training"]["images_seen"] == 8
  assert meta["training"]["wall_seconds"] > 0
  x = np.zeros((2, 32, 32, 3), np.float32)
  assert model.apply(variables, x, np.array([0, 999], np.int32)).shape == (2, 32, 32, 3)

  # Another architecture in the same workdir: refused, naming each field with its saved and new value.
  config.model.config.ch = 16
  config.model.config.num_res_blocks = 2
  config.train.num_steps = 3
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"model\.config\.ch: 8 -> 16; model\.config\.num_res_blocks: 1 -> 2\. Use a new"):
    train_fp.train_and_evaluate(config, tmp_path / "run")


def test_stop_after_seconds_checkpoints_and_exports_then_resumes(tmp_path):
  config = runlocal(num_steps=4, stop_after_seconds=1e-9)
  config.data.data_dir = str(tmp_path / "tfds")
  config.sample.num_samples = 0
  result = train_fp.train_and_evaluate(config, tmp_path / "run")
  assert result["final_step"] == 1  # stopped after the first step, with a checkpoint and the exported model
  assert load(tmp_path / "run" / "model")[2]["training"]["steps"] == 1
  config.train.stop_after_seconds = 0.0
  result = train_fp.train_and_evaluate(config, tmp_path / "run")
  assert result["final_step"] == 4
  wall = json.loads((tmp_path / "run" / "train_wall_seconds.json").read_text())
  assert wall["step"] == 4 and wall["seconds"] >= result["train_seconds_this_run"]


def test_init_from_an_exported_model_goes_on_from_its_weights_and_step(tmp_path):
  config = runlocal(num_steps=2)
  config.data.data_dir = str(tmp_path / "tfds")
  config.sample.num_samples = 0
  train_fp.train_and_evaluate(config, tmp_path / "first")
  _, shipped, shipped_meta = load(tmp_path / "first" / "model")

  # A workdir without checkpoints (a new machine) warm-starts from the exported EMA weights at their step.
  config.train.num_steps = 4  # the optimizer's warm-up restarts: its first step has learning rate 0
  config.train.init_from = str(tmp_path / "first" / "model")
  result = train_fp.train_and_evaluate(config, tmp_path / "second")
  assert result["final_step"] == 4 and result["images_seen"] == 16
  meta = load(tmp_path / "second" / "model")[2]
  assert meta["training"]["steps"] == 4
  assert meta["training"]["wall_seconds"] >= shipped_meta["training"]["wall_seconds"]
  # Two steps from the shipped weights: close to them, not a fresh initialization.
  state, _ = checkpoint.CheckpointManager(tmp_path / "second" / "checkpoints").restore(4)
  distance = max(float(np.max(np.abs(a - b))) for a, b in
                 zip(jax.tree.leaves(state["params"]), jax.tree.leaves(shipped["params"])))
  assert 0 < distance < 0.1

  # init_from a model of another width: refused, naming the field.
  config.model.config.ch = 16
  with pytest.raises(ValueError, match=r"another architecture than the config: ch: 8 \(model\) vs 16"):
    train_fp.train_and_evaluate(config, tmp_path / "third")


def test_a_second_training_on_a_workdir_fails_naming_the_holder(tmp_path):
  import os
  import subprocess
  import sys

  from msfp_jax.run import lock
  repo = pathlib.Path(__file__).resolve().parents[1]
  with lock.WorkdirLock(tmp_path):  # this process holds the workdir, as a running training would
    out = subprocess.run([sys.executable, "-m", "msfp_jax.train_fp", "--config=configs/default_fp.py:runlocal",
                          f"--workdir={tmp_path}"], cwd=repo, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ))
  assert out.returncode != 0
  assert f"pid {os.getpid()}" in out.stderr and "in use" in out.stderr, out.stderr[-2000:]
  assert "Traceback" not in out.stderr and not (tmp_path / "checkpoints").exists()


def test_divergence_stops_before_the_diverged_state_is_saved(tmp_path):
  # Warm-up makes step 1's learning rate 0; step 2's update (lr 1e6) blows the model up, but step 2's loss is
  # that of the state before it: the state to be saved is checked, and nothing diverged is checkpointed.
  config = runlocal(learning_rate=1e6)
  config.data.data_dir = str(tmp_path / "tfds")
  with pytest.raises(train_fp.TrainingDivergedError,
                     match=r"diverged at step 2: .*checked before it is saved.*last good checkpoint: step 1 in "
                           r".*train\.divergence_factor") as info:
    train_fp.train_and_evaluate(config, tmp_path / "run")
  assert isinstance(info.value, ValueError)  # the command line reports ValueErrors in one line
  assert checkpoint.CheckpointManager(tmp_path / "run" / "checkpoints").all_steps() == [1]
  assert not (tmp_path / "run" / "model").exists()


def test_sigterm_saves_and_stops_and_a_kill_during_a_save_leaves_no_duplicate_metrics(tmp_path, monkeypatch,
                                                                                      capsys):
  import signal

  from msfp_jax import guards, metrics

  def config_for(steps):
    config = runlocal(num_steps=steps, checkpoint_every=10)
    config.data.data_dir = str(tmp_path / "tfds")
    config.sample.num_samples = 0
    return config

  real_progress, real_save = metrics.progress, checkpoint.CheckpointManager.save
  monkeypatch.setattr(train_fp.metrics, "progress",
                      fakes.progress_with_fault(real_progress, 1, fault=fakes.send_sigterm))
  with pytest.raises(guards.TrainingInterrupted) as info:
    train_fp.train_and_evaluate(config_for(3), tmp_path / "run")
  assert info.value.code == 128 + signal.SIGTERM
  assert "interrupted at step 1; rerun the same command to resume" in capsys.readouterr().err
  assert checkpoint.CheckpointManager(tmp_path / "run" / "checkpoints").all_steps() == [1]
  monkeypatch.setattr(train_fp.metrics, "progress", real_progress)

  # A kill inside the step-3 save, after step 3 was logged.
  monkeypatch.setattr(checkpoint.CheckpointManager, "save", fakes.save_with_fault(real_save, 3))
  with pytest.raises(fakes.Killed):
    train_fp.train_and_evaluate(config_for(3), tmp_path / "run")
  monkeypatch.setattr(checkpoint.CheckpointManager, "save", real_save)
  steps = lambda: [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert steps() == [1, 2, 3]
  result = train_fp.train_and_evaluate(config_for(3), tmp_path / "run")
  assert result["final_step"] == 3 and steps() == [1, 2, 3]


def test_bad_command_lines_end_in_one_line(tmp_path):
  import os
  import subprocess
  import sys
  repo = pathlib.Path(__file__).resolve().parents[1]
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  for args, expected in (
      ([f"--workdir={tmp_path / 'run'}", "--config.train.learning_ratee=1"],
       "error: Unknown config field --config.train.learning_ratee: config.train has no field 'learning_ratee'. "
       "Did you mean --config.train.learning_rate?"),
      ([f"--workdir={a_file}"], f"error: --workdir={a_file} is a file, not a directory")):
    out = subprocess.run([sys.executable, "-m", "msfp_jax.train_fp", "--config=configs/default_fp.py:runlocal",
                          *args], cwd=repo, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), out.stderr[-2000:]
    assert "Traceback" not in out.stderr
  assert not (tmp_path / "run").exists()
