"""End to end: train_fp's runlocal variant for 2 steps, export, resume, bad resume."""
import json
import pathlib

import jax
import numpy as np
import pytest

from configs import default_fp
from msfp_jax import checkpoint, train_fp
from msfp_jax.models import load


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
