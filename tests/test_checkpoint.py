"""msfp_jax.checkpoint: restoring the newest step checkpoint that reads, skipping (and keeping aside) corrupt ones."""
import pathlib

import numpy as np
import pytest

from msfp_jax import checkpoint


def _tree(step):
  return {"a": np.arange(1000, dtype=np.float32) * step, "b": {"c": np.full((4, 4), step, np.float32)}}


def _manager_with_steps(directory, steps=(10, 20, 30)):
  with checkpoint.CheckpointManager(directory, max_to_keep=5) as manager:
    for s in steps:
      manager.save(s, _tree(s), config={"seed": 0})
    manager.wait_until_finished()
  return directory


def _truncate_largest(step_dir: pathlib.Path) -> None:
  files = sorted((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)
  with open(files[0], "r+b") as f:
    f.truncate(files[0].stat().st_size // 2)


def test_restore_newest_skips_a_truncated_checkpoint_naming_it(tmp_path, capsys):
  directory = _manager_with_steps(tmp_path / "ckpt")
  _truncate_largest(directory / "30")
  with checkpoint.CheckpointManager(directory) as manager:
    restored = manager.restore_newest(target=_tree(0))
    assert restored.step == 20
    np.testing.assert_array_equal(restored.state["a"], _tree(20)["a"])
    assert restored.config == {"seed": 0}
    assert [s for s, _ in restored.skipped] == [30]
    # Moved aside (kept for inspection), so the run can write step 30 again.
    assert manager.all_steps() == [10, 20]
    assert (tmp_path / "ckpt_unreadable" / "30").is_dir()
    manager.save(30, _tree(30), config={"seed": 0})
    manager.wait_until_finished()
  err = capsys.readouterr().err
  assert "step 30" in err and "could not be restored" in err and "ckpt_unreadable" in err, err
  assert "the newest one that restores, step 20" in err, err


def test_restore_newest_when_nothing_restores_is_one_error_naming_each_step(tmp_path):
  directory = _manager_with_steps(tmp_path / "ckpt", steps=(10, 20))
  _truncate_largest(directory / "10")
  _truncate_largest(directory / "20")
  with checkpoint.CheckpointManager(directory) as manager:
    with pytest.raises(checkpoint.CheckpointError, match=r"None of the checkpoints.*step 20: .*step 10: "):
      manager.restore_newest(target=_tree(0))


def test_restore_newest_lets_the_config_check_fail_and_returns_none_when_empty(tmp_path):
  directory = _manager_with_steps(tmp_path / "ckpt", steps=(10,))

  def refuse(config, step):
    raise ValueError(f"other config at step {step}")

  with checkpoint.CheckpointManager(directory) as manager:
    with pytest.raises(ValueError, match="other config at step 10"):
      manager.restore_newest(target=_tree(0), check_config=refuse)
    assert manager.all_steps() == [10]  # a config mismatch is not corruption: nothing is moved
  with checkpoint.CheckpointManager(tmp_path / "empty") as manager:
    assert manager.restore_newest(target=_tree(0)).step is None
