"""msfp_jax.checkpoint: restoring the newest step checkpoint that reads, skipping (and keeping aside) corrupt ones."""
import pathlib
import sys

import numpy as np
import pytest

from msfp_jax import checkpoint

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "train"))
import fakes  # noqa: E402


def _tree(step):
  return {"a": np.arange(1000, dtype=np.float32) * step, "b": {"c": np.full((4, 4), step, np.float32)}}


def _manager_with_steps(directory, steps=(10, 20, 30)):
  with checkpoint.CheckpointManager(directory, max_to_keep=5) as manager:
    for s in steps:
      manager.save(s, _tree(s), config={"seed": 0})
    manager.wait_until_finished()
  return directory


def test_restore_newest_skips_a_truncated_checkpoint_naming_it(tmp_path, capsys):
  directory = _manager_with_steps(tmp_path / "ckpt")
  fakes.truncate_checkpoint_data(directory / "30")
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
  fakes.truncate_checkpoint_data(directory / "10")
  fakes.truncate_checkpoint_data(directory / "20")
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


# ------------------------------------------------------------------------------- one-shot trees and JSON
def test_save_tree_and_load_tree_round_trip_with_the_target_dtypes(tmp_path):
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": {"count": np.int32(3)}}
  checkpoint.save_tree(tmp_path / "t", tree)
  loaded = checkpoint.load_tree(tmp_path / "t")
  np.testing.assert_array_equal(loaded["w"], tree["w"])
  assert isinstance(loaded["w"], np.ndarray) and int(loaded["n"]["count"]) == 3
  # The target's dtypes win (a float64 target gets float64 leaves); the saved values stay.
  target = {"w": np.zeros((2, 3), np.float64), "n": {"count": np.zeros((), np.int32)}}
  again = checkpoint.load_tree(tmp_path / "t", target=target)
  assert again["w"].dtype == np.float64
  np.testing.assert_array_equal(again["w"], tree["w"])
  checkpoint.save_tree(tmp_path / "t", {"w": np.ones((1,), np.float32)})  # overwrites
  assert checkpoint.load_tree(tmp_path / "t")["w"].shape == (1,)


def test_load_tree_names_every_missing_unexpected_and_mis_shaped_leaf(tmp_path):
  checkpoint.save_tree(tmp_path / "t", {"a": np.zeros((2,), np.float32), "b": {"c": np.zeros((3,), np.float32)}})
  target = {"a": np.zeros((5,), np.float32), "d": np.zeros((1,), np.float32)}
  with pytest.raises(checkpoint.CheckpointError) as error:
    checkpoint.load_tree(tmp_path / "t", target=target)
  message = str(error.value)
  assert "does not match the expected structure" in message
  assert "missing (1): d" in message and "unexpected (1): b/c" in message
  assert "mis-shaped (1): a (2,) (expected (5,))" in message
  with pytest.raises(checkpoint.CheckpointError, match="No checkpoint at"):
    checkpoint.load_tree(tmp_path / "absent")
  (tmp_path / "garbage").mkdir()
  (tmp_path / "garbage" / "x").write_text("not orbax")
  with pytest.raises(checkpoint.CheckpointError, match="Could not read the checkpoint"):
    checkpoint.load_tree(tmp_path / "garbage")


def test_save_json_writes_numpy_values_and_load_json_names_a_bad_file(tmp_path):
  path = tmp_path / "deep" / "x.json"
  checkpoint.save_json(path, {"b": np.float32(0.5), "a": np.int64(2), "arr": np.arange(2), "t": (1, 2)})
  assert checkpoint.load_json(path) == {"a": 2, "arr": [0, 1], "b": 0.5, "t": [1, 2]}
  assert path.read_text().index('"a"') < path.read_text().index('"b"'), "keys sorted"
  assert list(path.parent.iterdir()) == [path], "no temporary file stays behind"
  with pytest.raises(TypeError, match="object is not JSON serializable"):
    checkpoint.save_json(tmp_path / "y.json", {"x": object()})
  assert not (tmp_path / "y.json").exists() and list(tmp_path.glob("y.json*")) == []
  with pytest.raises(checkpoint.CheckpointError, match="it does not exist"):
    checkpoint.load_json(tmp_path / "none.json")
  (tmp_path / "bad.json").write_text("{")
  with pytest.raises(checkpoint.CheckpointError, match="bad.json is not valid JSON"):
    checkpoint.load_json(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------- atomic writes
def test_atomic_file_fsyncs_the_file_and_its_directory_before_and_after_the_rename(tmp_path, monkeypatch):
  import os
  import stat
  events = []
  real_fsync, real_replace = os.fsync, os.replace

  def fsync(fd):
    events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
    real_fsync(fd)

  def replace(src, dst):
    events.append("replace")
    real_replace(src, dst)
  monkeypatch.setattr(os, "fsync", fsync)
  monkeypatch.setattr(os, "replace", replace)
  path = tmp_path / "out.txt"
  path.write_text("old")
  with checkpoint.atomic_file(path, "w") as f:
    f.write("new")
    assert path.read_text() == "old", "the target changes only when the block completes"
  assert path.read_text() == "new"
  assert events == ["fsync file", "replace", "fsync dir"]


def test_an_interrupted_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "accum_0.npz"
  checkpoint.atomic_savez(path, x=np.arange(3))
  with pytest.raises(KeyboardInterrupt):
    with checkpoint.atomic_file(path) as f:
      f.write(b"partial")
      raise KeyboardInterrupt
  np.testing.assert_array_equal(np.load(path)["x"], np.arange(3))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["accum_0.npz"]
  checkpoint.atomic_write_text(tmp_path / "a.txt", "text")
  assert (tmp_path / "a.txt").read_text() == "text"


def test_temporary_names_are_recognised_and_never_match_the_target_glob(tmp_path):
  with checkpoint.atomic_path(tmp_path / "results.json") as tmp:
    assert checkpoint.is_temporary(tmp) and tmp.parent == tmp_path
    assert not tmp.match("*.json"), "a reader globbing *.json must not pick up a write in progress"
    tmp.write_text("{}")
  assert not checkpoint.is_temporary(tmp_path / "results.json")
  assert not checkpoint.is_temporary(tmp_path / "events.out.tfevents.1.host.tmp")  # only our own suffix


# ------------------------------------------------------------------------------------ the mismatch message
def test_tree_mismatch_lists_each_kind_sorted_and_none_when_equal():
  import jax
  expected = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 8), np.float32), "bias": np.zeros(8)},
              "norm": {"scale": np.zeros(8)}}
  same_shapes = {"conv": {"kernel": np.zeros((3, 3, 4, 8)), "bias": np.zeros(8)},
                 "norm": {"scale": np.zeros(8, np.int8)}}
  assert checkpoint.tree_mismatch(expected, same_shapes) is None, "dtypes are not compared"
  actual = {"conv": {"kernel": np.zeros((3, 3, 4, 16)), "bias": np.zeros(8)}, "extra": np.zeros(1),
            "also": np.zeros(2)}
  assert checkpoint.tree_mismatch(expected, actual) == (
      "missing (1): norm/scale; unexpected (2): also, extra; mis-shaped (1): conv/kernel (3, 3, 4, 16) "
      "(expected (3, 3, 4, 8))")


def test_mismatch_listing_counts_everything_but_lists_at_most_max_listed():
  names = [f"k{i:03d}" for i in range(checkpoint.MAX_LISTED + 5)]
  listing = checkpoint.mismatch_listing(names, [], ["w (1,) (expected (2,))"], noun="keys")
  assert listing.startswith(f"missing keys ({checkpoint.MAX_LISTED + 5}): k000, k001")
  assert f"k{checkpoint.MAX_LISTED - 1:03d} ... and 5 more; mis-shaped keys (1): w (1,)" in listing
  assert f"k{checkpoint.MAX_LISTED:03d}" not in listing
  assert checkpoint.mismatch_listing([], [], []) == ""


# --------------------------------------------------------------------------------------- step checkpoints
def test_manager_saves_state_and_config_per_step_and_keeps_the_newest(tmp_path):
  with checkpoint.CheckpointManager(tmp_path / "ckpt", max_to_keep=2) as manager:
    assert manager.latest_step() is None and manager.saved_config() is None
    with pytest.raises(checkpoint.CheckpointError, match="No checkpoint to restore"):
      manager.restore()
    manager.save(1, _tree(1), config={"lr": 0.1, "shape": (2, 3)})
    manager.save(2, _tree(2))
    manager.save(3, _tree(3), config={"lr": 0.3})
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3] and manager.latest_step() == 3
    assert manager.saved_config() == {"lr": 0.3} and manager.saved_config(2) is None
    state, config = manager.restore(2, target=_tree(0))
    np.testing.assert_array_equal(state["b"]["c"], _tree(2)["b"]["c"])
    assert config is None
    with pytest.raises(checkpoint.CheckpointError, match=r"does not match the expected structure: missing \(1\)"):
      manager.restore(3, target={**_tree(0), "new": np.zeros(1, np.float32)})
