"""Faults fine-tuning survives (issue 14): divergence (finite or NaN), a kill between or during checkpoint saves
(no duplicate metrics), SIGINT / SIGTERM (one clean stop, resumable), a corrupted latest checkpoint.

Every run is the tiny model of tiny_setup (8 steps, checkpoints every 4), so each fine-tuning here takes seconds.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msfp_jax import checkpoint, guards
from msfp_jax.train import finetune as finetune_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import fakes  # noqa: E402
import tiny_setup  # noqa: E402

NUM_STEPS = 8
WORKER = pathlib.Path(__file__).resolve().parent / "interrupt_worker.py"


def _config(model_dir, **overrides):
  base = {"finetune.num_steps": NUM_STEPS, "finetune.checkpoint_every": 4}
  base.update(overrides)
  return tiny_setup.tiny_config(model_dir, **base)


def _records(workdir):
  return [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]


def _tensorboard_loss_steps(workdir):
  """Steps of every `loss` scalar in the workdir's TensorBoard event files (what TensorBoard would plot)."""
  import tensorflow as tf
  steps = []
  for path in sorted((pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(str(path)):
      event = tf.compat.v1.Event.FromString(record.numpy())
      steps += [event.step for v in event.summary.value if v.tag == "loss"]
  return sorted(steps)


def _assert_same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tmp_path_factory):
  """An uninterrupted run of _config: its workdir and result."""
  workdir = tmp_path_factory.mktemp("reference")
  return workdir, finetune_lib.finetune(_config(tiny_model_dir), workdir)


# ----------------------------------------------------------------------------------------------- divergence
def test_one_diverged_error_type_that_the_cli_reports_in_one_line():
  from msfp_jax import train_fp
  # main.py turns ValueError into one usage line; both loops raise the same class.
  assert finetune_lib.TrainingDivergedError is guards.TrainingDivergedError
  assert train_fp.TrainingDivergedError is guards.TrainingDivergedError
  assert issubclass(guards.TrainingDivergedError, ValueError)


def test_divergence_guard_compares_with_the_running_median():
  guard = guards.DivergenceGuard(100.0, window=4, what="loss", hint="lower the lr")
  for step, loss in enumerate([1.0, 0.5, 2.0, 0.7, 40.0], start=1):  # 40 < 100 x median(1, .5, 2, .7)
    guard.check(step, loss, last_good="none")
  with pytest.raises(guards.TrainingDivergedError,
                     match=r"diverged at step 6: loss 500 is more than 100 x its running median 1\.35.*"
                           r"last good checkpoint: step 4 in D.*lower the lr"):
    guard.check(6, 500.0, last_good="step 4 in D")
  with pytest.raises(guards.TrainingDivergedError, match=r"at step 7: loss nan"):
    guard.check(7, float("nan"), last_good="none")
  off = guards.DivergenceGuard(0.0, what="loss", hint="")  # 0 turns the median check off (not the NaN check)
  off.check(1, 1.0, last_good="none")
  off.check(2, 1e30, last_good="none")
  with pytest.raises(guards.TrainingDivergedError):
    off.check(3, float("inf"), last_good="none")


def test_finite_divergence_stops_before_it_is_checkpointed(tiny_model_dir, tmp_path):
  # The repro of issue 14 (lr 1e3 for LoRA and the weight scales): loss 0.02 -> 5e6, exit 0, broken checkpoints.
  config = _config(tiny_model_dir, **{"finetune.lr.lora": 1e3, "finetune.lr.weight_scale": 1e3,
                                      "finetune.num_steps": 12})
  with pytest.raises(finetune_lib.TrainingDivergedError) as info:
    finetune_lib.finetune(config, tmp_path)
  message = str(info.value)
  step = int(message.split("diverged at step ")[1].split(":")[0])
  assert "finetune.divergence_factor" in message and "finetune.lr." in message, message
  saved = checkpoint.CheckpointManager(tmp_path / finetune_lib.CHECKPOINT_DIR).all_steps()
  assert all(s < step for s in saved), (saved, message)
  good = f"last good checkpoint: step {max(saved)}" if saved else "no checkpoint was written"
  assert good in message, message
  # Nothing of the diverged steps was logged as if it were training.
  assert [r["step"] for r in _records(tmp_path)] == list(range(1, step))


def test_an_update_that_diverges_at_a_checkpoint_step_is_not_saved(tiny_model_dir, tmp_path, monkeypatch):
  """The loss of step s is computed before step s's update: a blow-up in the update of a checkpoint step must be
  caught before that state is written (the loop checks the saved state's loss first)."""
  real = finetune_lib.make_train_step

  def exploding_make_train_step(loss_fn, tx, mesh):
    step_fn = real(loss_fn, tx, mesh)

    def wrapped(state, *args):
      new_state, out = step_fn(state, *args)
      if int(new_state.step) == 4:  # the update of checkpoint step 4 explodes the LoRA factors
        banks = jax.tree.map(lambda b: b * jnp.nan, new_state.params["banks"])  # NaN: diverged on any batch
        new_state = new_state.replace(params={**new_state.params, "banks": banks})
      return new_state, out
    return wrapped

  monkeypatch.setattr(finetune_lib, "make_train_step", exploding_make_train_step)
  config = _config(tiny_model_dir, **{"finetune.checkpoint_every": 2})
  with pytest.raises(finetune_lib.TrainingDivergedError, match=r"last good checkpoint: step 2 in"):
    finetune_lib.finetune(config, tmp_path)
  assert checkpoint.CheckpointManager(tmp_path / finetune_lib.CHECKPOINT_DIR).all_steps() == [2]


def test_nan_names_the_fields_to_change(tiny_model_dir, tmp_path):
  config = _config(tiny_model_dir, **{"finetune.lr.lora": float("inf"), "finetune.checkpoint_every": 1})
  with pytest.raises(ValueError, match=r"diverged at step \d+: loss (nan|inf).*finetune\.lr\..*grad_clip_norm"):
    finetune_lib.finetune(config, tmp_path)


# ----------------------------------------------------------------------------------------------- kills
def test_kill_between_saves_leaves_one_record_per_step(reference, tiny_model_dir, tmp_path, monkeypatch):
  real_progress = finetune_lib.metrics.progress
  config = _config(tiny_model_dir)
  # Killed after step 6: steps 5 and 6 are logged, the checkpoint of step 4 is the newest.
  monkeypatch.setattr(finetune_lib.metrics, "progress", fakes.progress_with_fault(real_progress, 6))
  with pytest.raises(fakes.Killed):
    finetune_lib.finetune(config, tmp_path)
  assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4, 5, 6]
  monkeypatch.setattr(finetune_lib.metrics, "progress", real_progress)
  resumed = finetune_lib.finetune(config, tmp_path)
  _assert_same_params(resumed.params, reference[1].params)
  records = _records(tmp_path)
  assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
  assert [r["loss"] for r in records] == [r["loss"] for r in _records(reference[0])]
  assert _tensorboard_loss_steps(tmp_path) == list(range(1, NUM_STEPS + 1))


def test_kill_during_a_save_leaves_one_record_per_step(reference, tiny_model_dir, tmp_path, monkeypatch):
  """The condition of the 70 records for 60 steps: step 8's record is written, then its save never completes
  (killed inside orbax), so the run resumes from step 4 and logs steps 5-8 again."""
  real_save = checkpoint.CheckpointManager.save
  config = _config(tiny_model_dir)
  monkeypatch.setattr(checkpoint.CheckpointManager, "save", fakes.save_with_fault(real_save, 8))
  with pytest.raises(fakes.Killed):
    finetune_lib.finetune(config, tmp_path)
  assert [r["step"] for r in _records(tmp_path)][-1] == 8
  assert checkpoint.CheckpointManager(tmp_path / finetune_lib.CHECKPOINT_DIR).all_steps() == [4]
  monkeypatch.setattr(checkpoint.CheckpointManager, "save", real_save)
  resumed = finetune_lib.finetune(config, tmp_path)
  _assert_same_params(resumed.params, reference[1].params)
  assert [r["step"] for r in _records(tmp_path)] == list(range(1, NUM_STEPS + 1))
  assert _tensorboard_loss_steps(tmp_path) == list(range(1, NUM_STEPS + 1))


# ----------------------------------------------------------------------------------------------- a corrupted checkpoint
def test_corrupted_latest_checkpoint_falls_back_to_the_newest_that_restores(reference, tiny_model_dir, tmp_path,
                                                                           capsys):
  import shutil
  ref_dir, ref = reference
  shutil.copytree(ref_dir, tmp_path, dirs_exist_ok=True)
  ckpt_dir = tmp_path / finetune_lib.CHECKPOINT_DIR
  fakes.truncate_checkpoint_data(ckpt_dir / str(NUM_STEPS))
  capsys.readouterr()
  resumed = finetune_lib.finetune(_config(tiny_model_dir), tmp_path)
  out = capsys.readouterr()
  text = out.out + out.err
  assert f"step {NUM_STEPS}" in text and "could not be restored" in text, text
  assert "Using the newest one that restores, step 4" in text, text
  # Steps 5-8 are recomputed from step 4, bit-identical; the unreadable checkpoint was moved aside, not deleted.
  assert resumed.step == NUM_STEPS
  _assert_same_params(resumed.params, ref.params)
  assert checkpoint.CheckpointManager(ckpt_dir).all_steps() == [4, 8]
  set_aside = tmp_path / (finetune_lib.CHECKPOINT_DIR + "_unreadable")
  assert any(p.name.startswith(str(NUM_STEPS)) for p in set_aside.iterdir())
  assert [r["step"] for r in _records(tmp_path)] == list(range(1, NUM_STEPS + 1))
  # The later stages read the repaired checkpoint.
  _assert_same_params(finetune_lib.load_finetuned(_config(tiny_model_dir), tmp_path).params, ref.params)


def test_load_finetuned_names_an_unreadable_checkpoint_and_the_way_out(reference, tiny_model_dir, tmp_path):
  import shutil
  shutil.copytree(reference[0], tmp_path, dirs_exist_ok=True)
  fakes.truncate_checkpoint_data(tmp_path / finetune_lib.CHECKPOINT_DIR / str(NUM_STEPS))
  with pytest.raises(checkpoint.CheckpointError, match=r"step 8 .*could not be read.*--mode=finetune"):
    finetune_lib.load_finetuned(_config(tiny_model_dir), tmp_path)


# ----------------------------------------------------------------------------------------------- signals
def test_sigterm_stops_at_a_step_boundary_saves_and_resumes(reference, tiny_model_dir, tmp_path, monkeypatch,
                                                           capsys):
  real_progress = finetune_lib.metrics.progress
  config = _config(tiny_model_dir)
  monkeypatch.setattr(finetune_lib.metrics, "progress",
                      fakes.progress_with_fault(real_progress, 5, fault=fakes.send_sigterm))
  with pytest.raises(guards.TrainingInterrupted) as info:
    finetune_lib.finetune(config, tmp_path)
  assert info.value.code == 128 + signal.SIGTERM and info.value.step == 5
  assert "interrupted at step 5; rerun the same command to resume" in capsys.readouterr().err
  assert checkpoint.CheckpointManager(tmp_path / finetune_lib.CHECKPOINT_DIR).all_steps() == [4, 5]
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone with the loop
  monkeypatch.setattr(finetune_lib.metrics, "progress", real_progress)
  resumed = finetune_lib.finetune(config, tmp_path)
  _assert_same_params(resumed.params, reference[1].params)
  assert [r["step"] for r in _records(tmp_path)] == list(range(1, NUM_STEPS + 1))


def _start_worker(model_dir, workdir, *extra):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, str(WORKER), str(model_dir), str(workdir), *extra],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _signal_during_save(proc, step, signals):
  """Reads the worker's output; when the save of `step` starts, sends `signals` (0.3 s apart). Returns the output."""
  import time
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.strip() == f"SAVE-START {step}":
      for sig in signals:
        proc.send_signal(sig)
        time.sleep(0.3)
  proc.wait(timeout=600)
  return "".join(lines)


def test_sigint_during_a_save_finishes_it_and_exits_once(reference, tiny_model_dir, tmp_path):
  """Ctrl-C while the step-4 checkpoint is written (through the CLI): the save completes, one line, exit 130."""
  proc = _start_worker(tiny_model_dir, tmp_path)
  output = _signal_during_save(proc, 4, [signal.SIGINT])
  assert proc.returncode == 128 + signal.SIGINT, output[-3000:]
  assert "interrupted at step 4; rerun the same command to resume" in output, output[-3000:]
  assert "Traceback" not in output and "cannot schedule new futures" not in output, output[-3000:]
  assert checkpoint.CheckpointManager(tmp_path / finetune_lib.CHECKPOINT_DIR).all_steps() == [4]
  resumed = finetune_lib.finetune(_config(tiny_model_dir), tmp_path)
  _assert_same_params(resumed.params, reference[1].params)
  assert [r["step"] for r in _records(tmp_path)] == list(range(1, NUM_STEPS + 1))


def test_a_second_sigint_abandons_the_save_and_a_sigkill_during_a_save_loses_nothing(reference, tiny_model_dir,
                                                                                      tmp_path):
  # Two Ctrl-C during the step-8 save: the save is abandoned (orbax writes it under a temporary name), step 4 stays.
  proc = _start_worker(tiny_model_dir, tmp_path / "twice")
  output = _signal_during_save(proc, 8, [signal.SIGINT, signal.SIGINT])
  assert proc.returncode == 128 + signal.SIGINT, output[-3000:]
  assert "abandoned" in output and "Traceback" not in output, output[-3000:]
  # SIGKILL during the step-8 save: its metrics record is written, the checkpoint is not.
  proc = _start_worker(tiny_model_dir, tmp_path / "killed")
  output = _signal_during_save(proc, 8, [signal.SIGKILL])
  assert proc.returncode == -signal.SIGKILL, output[-3000:]
  assert [r["step"] for r in _records(tmp_path / "killed")][-1] == 8
  for name in ("twice", "killed"):
    assert checkpoint.CheckpointManager(tmp_path / name / finetune_lib.CHECKPOINT_DIR).all_steps() == [4]
    resumed = finetune_lib.finetune(_config(tiny_model_dir), tmp_path / name)
    _assert_same_params(resumed.params, reference[1].params)
    assert [r["step"] for r in _records(tmp_path / name)] == list(range(1, NUM_STEPS + 1)), name
