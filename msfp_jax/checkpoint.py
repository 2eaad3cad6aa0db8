"""The one module that talks to orbax.

orbax's API churns between releases; everything else in msfp_jax saves and restores through the few
functions here, so an orbax upgrade touches one file.

Two uses:
  * one-shot pytrees (a converted model, a calibration state): `save_tree` / `load_tree`;
  * step checkpoints of a long job (fine-tuning, training the default model): `CheckpointManager`, which
    stores the array state and the run's config (JSON) as named items of one step, so a resumed run can
    check it was started with the same config.

Beside them, the two things every other file writer and loader of msfp_jax shares:
  * `atomic_file` / `atomic_path` (and `save_json`, `atomic_write_text`, `atomic_savez` on top): a file is
    written under a temporary name, flushed to disk, renamed over the target and its directory entry flushed,
    so a reader never sees a partial file and a crash leaves the old file or the new one;
  * `tree_mismatch` / `mismatch_listing`: the one message naming the missing, unexpected and mis-shaped leaves
    of a loaded tree against the expected one (checkpoints, converted models, the Inception weights);
  * `file_sha256`: what a result records of a file it read (a dataset archive, the Inception weights).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

# Per category, in mismatch messages: enough to see the pattern of a wrong architecture, short enough to read.
MAX_LISTED = 30


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


def _leaf_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_paths(tree: Any) -> dict[str, Any]:
  """The leaves of `tree` keyed by their '/'-joined path ("down_0/conv1/kernel")."""
  return {"/".join(_leaf_name(k) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def listing(title: str, items: Sequence[str]) -> str:
  """'title (3): a, b, c': the count and at most MAX_LISTED of `items` (the caller orders them)."""
  more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
  return f"{title} ({len(items)}): " + ", ".join(items[:MAX_LISTED]) + more


def mismatch_listing(missing: Sequence[str], unexpected: Sequence[str], misshaped: Sequence[str], *,
                     noun: str = "", separator: str = "; ") -> str:
  """'missing keys (2): a, b; unexpected keys (1): c; mis-shaped keys (1): d (3,) (expected (4,))'.

  The non-empty categories, in that order, each a `listing`, joined by `separator`. `noun` follows each
  category's name ("keys" for a state dict's keys).
  """
  categories = (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
  return separator.join(listing(f"{title}{' ' + noun if noun else ''}", items) for title, items in categories
                        if items)


def tree_mismatch(expected: Any, actual: Any, *, separator: str = "; ") -> str | None:
  """How the leaf paths and shapes of `actual` differ from `expected` (`mismatch_listing`); None if they do not.

  Leaves may be arrays or anything with a `.shape` (e.g. jax.ShapeDtypeStruct); dtypes are not compared.
  """
  want, got = leaf_paths(expected), leaf_paths(actual)
  misshaped = sorted(f"{k} {tuple(np.shape(got[k]))} (expected {tuple(np.shape(want[k]))})"
                     for k in set(want) & set(got) if tuple(np.shape(got[k])) != tuple(np.shape(want[k])))
  problems = mismatch_listing(sorted(set(want) - set(got)), sorted(set(got) - set(want)), misshaped,
                              separator=separator)
  return problems or None


def _check_against_target(restored: Any, target: Any, directory: pathlib.Path) -> None:
  problem = tree_mismatch(target, restored)
  if problem:
    raise CheckpointError(f"Checkpoint {directory} does not match the expected structure: {problem}. "
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


_TEMPORARY = re.compile(r"\.tmp\d+$")


def is_temporary(path: str | os.PathLike) -> bool:
  """Whether `path` is the temporary name of an atomic write in progress (or one a killed process left)."""
  return bool(_TEMPORARY.search(pathlib.Path(path).name))


def _fsync_directory(directory: pathlib.Path) -> None:
  # A rename is durable once the directory entry is on disk too. POSIX lets a directory be opened read-only and
  # fsynced; Windows cannot open one, and some file systems refuse fsync on it: there the rename is all we get.
  try:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path beside `path` for the block to write; then makes it `path`, atomically.

  When the block completes, the temporary file is fsynced (the rename must never expose a file whose data is
  not on disk yet), renamed over `path` (os.replace) and the directory fsynced. When it raises (an
  interruption included), the temporary file is removed and `path` is left as it was. The temporary name is
  `<name>.tmp<pid>` (`is_temporary`), so writers in several processes never collide and a reader globbing
  `*.json` or `*.npz` never picks it up. The parent directory is created if needed.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
  try:
    yield tmp
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except BaseException:  # a large temporary file must not stay behind
    tmp.unlink(missing_ok=True)
    raise
  _fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
  """`open(path, mode)` for writing, made atomic as `atomic_path` describes."""
  with atomic_path(path) as tmp, open(tmp, mode) as f:
    yield f


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_file(path, "w") as f:
    f.write(text)


def atomic_savez(path: str | os.PathLike, **arrays: Any) -> None:
  """np.savez, atomically; the file gets exactly `path` (a file object: numpy appends no ".npz")."""
  with atomic_file(path) as f:
    np.savez(f, **arrays)


def save_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes `obj` as indented, key-sorted JSON, atomically (numpy scalars and arrays, tuples and sets allowed)."""
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def file_sha256(path: str | os.PathLike) -> str:
  """The hex sha256 of a file's bytes, read in 1 MiB blocks (a file need not fit in memory)."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def load_json(path: str | os.PathLike) -> Any:
  return parse_file(path, json.loads, json.JSONDecodeError, syntax="JSON", error=CheckpointError,
                    missing=lambda p: CheckpointError(f"Expected a JSON file at {p}; it does not exist."))


def parse_file(path: str | os.PathLike, loads: Callable[[str], Any], syntax_error: type[Exception], *,
               syntax: str, error: type[Exception], missing: Callable[[pathlib.Path], Exception]) -> Any:
  """`loads` of the text file `path`. No such file raises `missing(path)`; text that `loads` rejects with
  `syntax_error` raises `error` naming the file as not valid `syntax`."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise missing(path)
  try:
    return loads(path.read_text())
  except syntax_error as e:
    raise error(f"{path} is not valid {syntax}: {e}") from e


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
    if target is not None:
      # Compared before reading: orbax reports a tree of other paths as an unreadable step, which
      # restore_newest would set aside as corrupt; a checkpoint of another model is not corrupt.
      saved = self._saved_state_metadata(step)
      if saved is not None:
        _check_against_target(saved, target, self.directory / str(step))
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

  def _saved_state_metadata(self, step: int) -> Any:
    """The saved state's tree of array metadata (each with its `.shape`); None when it cannot be read."""
    try:
      return self._manager.item_metadata(step)["state"].tree
    except Exception:  # pylint: disable=broad-except  (a damaged step: the restore itself names the problem)
      return None

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
      multihost_utils.sync_global_devices("msfp_jax.checkpoint.set_aside")
    self._manager.reload()
    print("\n".join(lines) + f" Using the newest one that restores, step {restored_step}.", file=sys.stderr,
          flush=True)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
