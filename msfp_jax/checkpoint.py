"""The one module that talks to orbax.

orbax's API churns between releases; everything else in msfp_jax saves and restores through the few
functions here, so an orbax upgrade touches one file.

Two uses:
  * one-shot pytrees (a converted model, a calibration state): `save_tree` / `load_tree`;
  * step checkpoints of a long job (fine-tuning, training the default model): `CheckpointManager`, which
    stores the array state and the run's config (JSON) as named items of one step, so a resumed run can
    check it was started with the same config.
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint is missing, unreadable, or does not match what the caller expects."""


class CheckpointUnreadableError(CheckpointError):
  """A step checkpoint's files could not be read (e.g. truncated by a full disk or a crash mid-copy)."""


class Restored(NamedTuple):
  """What `CheckpointManager.restore_newest` found: step None (and state/config None) when there is no step."""
  step: int | None
  state: Any
  config: dict | None
  skipped: list[tuple[int, str]]  # (step, why it could not be restored), newest first; moved aside


def _abs(path: str | os.PathLike) -> pathlib.Path:
  # orbax requires absolute paths.
  return pathlib.Path(path).expanduser().resolve()


def _to_numpy(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


def save_tree(directory: str | os.PathLike, tree: Any) -> None:
  """Saves a pytree of arrays to `directory` (overwritten if it exists)."""
  directory = _abs(directory)
  directory.parent.mkdir(parents=True, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, tree, force=True)
    checkpointer.wait_until_finished()


def _check_against_target(restored: Any, target: Any, directory: pathlib.Path) -> None:
  restored_paths = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(restored)}
  target_paths = {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
  missing = sorted(set(target_paths) - set(restored_paths))
  unexpected = sorted(set(restored_paths) - set(target_paths))
  misshaped = sorted(
      f"{k}: saved {np.shape(restored_paths[k])}, expected {np.shape(target_paths[k])}"
      for k in set(target_paths) & set(restored_paths)
      if np.shape(restored_paths[k]) != np.shape(target_paths[k]))
  if missing or unexpected or misshaped:
    raise CheckpointError(
        f"Checkpoint {directory} does not match the expected structure. "
        f"Missing: {missing or 'none'}; unexpected: {unexpected or 'none'}; mis-shaped: {misshaped or 'none'}. "
        "Was it written for another model or config?")


def load_tree(directory: str | os.PathLike, target: Any = None) -> Any:
  """Loads a pytree saved by `save_tree` as numpy arrays.

  With `target` (a pytree of arrays or ShapeDtypeStructs), the saved tree must have exactly the same
  paths and shapes; a mismatch raises CheckpointError naming the differing leaves.
  """
  directory = _abs(directory)
  if not directory.exists():
    raise CheckpointError(f"No checkpoint at {directory}.")
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(directory)
  except Exception as e:  # orbax raises many types; the caller needs one.
    raise CheckpointError(f"Could not read the checkpoint at {directory}: {e}") from e
  restored = _to_numpy(restored)
  if target is not None:
    _check_against_target(restored, target, directory)
    restored = jax.tree.map(lambda r, t: np.asarray(r, dtype=getattr(t, "dtype", None) or r.dtype), restored,
                            target)
  return restored


def save_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes JSON atomically (write to a temporary file, then rename)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))
  os.replace(tmp, path)


def load_json(path: str | os.PathLike) -> Any:
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"Expected a JSON file at {path}; it does not exist.")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _json_default(obj: Any) -> Any:
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (np.floating,)):
    return float(obj)
  if isinstance(obj, np.ndarray):
    return obj.tolist()
  if isinstance(obj, (tuple, set)):
    return list(obj)
  raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _first_line(error: Exception, limit: int = 300) -> str:
  # orbax's messages can list every key of the tree (tens of kB); the first clause is what a user needs.
  text = str(error).split("\n")[0]
  return text if len(text) <= limit else text[:limit] + " ..."


class CheckpointManager:
  """Step checkpoints of a long job: an array state plus the run's config as JSON, per step.

  Saves are synchronous by default: a job killed right after `save` returns has that step on disk.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = False):
    self.directory = _abs(directory)
    self.directory.mkdir(parents=True, exist_ok=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "config"))

  def save(self, step: int, state: Any, *, config: dict | None = None) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(json.dumps(config, default=_json_default)))
    self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def saved_config(self, step: int | None = None) -> dict | None:
    """The config saved with `step` (default: the latest), without reading the arrays; None if none."""
    step = self.latest_step() if step is None else step
    if step is None or not (self.directory / str(step) / "config").exists():
      return None
    try:
      return self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception as e:
      raise CheckpointUnreadableError(f"Could not read the config saved with step {step} in {self.directory}: "
                                      f"{_first_line(e)}") from e

  def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict | None]:
    """Restores (state, config) of `step` (default: the latest). `target` fixes structure and shapes."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint to restore in {self.directory}.")
    state_args = ocp.args.StandardRestore(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) if not isinstance(
            x, jax.ShapeDtypeStruct) else x, target)) if target is not None else ocp.args.StandardRestore()
    items = {"state": state_args}
    has_config = (self.directory / str(step) / "config").exists()
    if has_config:
      items["config"] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CheckpointUnreadableError(
          f"Could not restore step {step} from {self.directory}: {_first_line(e)}. If the checkpoint was "
          "written by a different config or model, start a new workdir.") from e
    state = _to_numpy(restored["state"])
    if target is not None:
      _check_against_target(state, target, self.directory / str(step))
    return state, (restored["config"] if has_config else None)

  def restore_newest(self, target: Any = None, *,
                     check_config: Callable[[dict | None, int], None] | None = None) -> Restored:
    """Restores the newest step that reads, skipping unreadable ones (a truncated or corrupted file).

    `check_config(saved_config, step)` runs on a step's config before its arrays are read; what it raises
    propagates (a run of another config is not a corrupt checkpoint, and is never skipped). Skipped steps are
    named on stderr and moved to `<directory>_unreadable/` (kept for inspection; the run may write the step
    again), but only once an older step has restored: when none restores, nothing is moved and one
    CheckpointError names every step's problem.
    """
    skipped: list[tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        config = self.saved_config(step)
        if check_config is not None:
          check_config(config, step)
        state, _ = self.restore(step, target=target)
      except CheckpointUnreadableError as e:
        skipped.append((step, _first_line(e.__cause__ or e)))
        continue
      if skipped:
        self._set_aside(skipped, step)
      return Restored(step, state, config, skipped)
    if skipped:
      raise CheckpointError(
          f"None of the checkpoints in {self.directory} could be restored: "
          + "; ".join(f"step {s}: {why}" for s, why in skipped)
          + ". Move the directory away to start this stage afresh.")
    return Restored(None, None, None, [])

  def _set_aside(self, skipped: list[tuple[int, str]], restored_step: int) -> None:
    aside = self.directory.parent / f"{self.directory.name}_unreadable"
    lines = []
    for step, why in skipped:
      dest = aside / str(step)
      n = 1
      while dest.exists():
        dest, n = aside / f"{step}.{n}", n + 1
      if jax.process_index() == 0:
        aside.mkdir(parents=True, exist_ok=True)
        os.replace(self.directory / str(step), dest)
      lines.append(f"Checkpoint step {step} in {self.directory} could not be restored ({why}); moved it to "
                   f"{dest}.")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("msfp_jax.checkpoint.set_aside")
    self._manager.reload()
    print("\n".join(lines) + f" Using the newest one that restores, step {restored_step}.", file=sys.stderr,
          flush=True)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
