"""The main job's workdir: the run of which config it holds, whether this process may use it, and how.

A workdir records the config of its run in config.json (msfp_jax.config_record.json_config) when the first stage
starts; a later command with another config is refused naming the fields that differ, except those a rerun may
change (config_record.MAIN_JOB_WORKDIR). A workdir this process cannot write is only read: the report of a
finished run is printed (msfp_jax.run.report.report_read_only), anything else is refused at once. One process
runs in a workdir at a time (msfp_jax.run.lock).
"""
from __future__ import annotations

import os
import pathlib

import jax
from absl import app

from msfp_jax import checkpoint, config_record

RUN_CONFIG_FILE = "config.json"

READ_ONLY = "is not writable (a read-only file system or no write permission)"
READ_ONLY_FIX = "Give a writable --workdir (a copy of this one keeps its results and resumes from them)."


def is_lead_process() -> bool:
  """Process 0 writes the files every process would write alike (config.json, timings, summaries)."""
  return jax.process_index() == 0


def is_remote(workdir) -> bool:
  """A URL (gs://...): checked by the file system layer, not here."""
  return "://" in str(workdir)


def check_workdir_config(config, workdir: pathlib.Path) -> None:
  """Refuses a workdir that holds a run of another config (naming the differences). Writes nothing: the config
  is recorded by `record_workdir_config` when the first stage starts."""
  path = pathlib.Path(workdir) / RUN_CONFIG_FILE
  if not path.is_file():
    return
  diffs = config_record.differences(checkpoint.load_json(path), config_record.json_config(config),
                                    config_record.MAIN_JOB_WORKDIR)
  if diffs:
    raise app.UsageError(
        f"{workdir} holds a run of a different config; differences: "
        f"{config_record.describe(diffs, config_record.CHECKPOINT_VS_NOW)}. Use a new --workdir, or rerun with the "
        "config that made it.")


def record_workdir_config(config, workdir: pathlib.Path) -> None:
  if is_lead_process():
    checkpoint.save_json(pathlib.Path(workdir) / RUN_CONFIG_FILE, config_record.json_config(config))


def check_workdir_path(workdir) -> None:
  """Refuses (one line) a --workdir that is a file or lies under one, before anything is computed."""
  if is_remote(workdir):
    return
  path = pathlib.Path(workdir)
  if path.exists() and not path.is_dir():
    raise app.UsageError(f"--workdir={workdir} is a file, not a directory. Give a directory (it is created when "
                         "missing), or move the file away.")
  for ancestor in path.parents:
    if ancestor.exists():
      if not ancestor.is_dir():
        raise app.UsageError(f"--workdir={workdir} cannot be created: {ancestor} is a file, not a directory.")
      break


def workdir_writable(workdir) -> bool:
  """Whether this process can create files in `workdir` (in its nearest existing ancestor when it is missing).
  access(2) answers EROFS for a read-only mount, for root too. A remote workdir counts as writable."""
  if is_remote(workdir):
    return True
  path = pathlib.Path(workdir)
  while not path.exists() and path != path.parent:
    path = path.parent
  return os.access(path, os.W_OK | os.X_OK)


def check_read_only_mode(config, workdir, mode: str) -> None:
  """For a workdir this process cannot write: refuses at once what needs writes (any mode but `all` and `report`,
  an ablation, a workdir that holds no run)."""
  workdir = pathlib.Path(workdir)
  reason = f"--workdir={workdir} {READ_ONLY}"
  if not workdir.is_dir():
    raise app.UsageError(f"--workdir={workdir} cannot be created: its parent {READ_ONLY}. {READ_ONLY_FIX}")
  if mode not in ("all", "report") or "ablation" in config:
    raise app.UsageError(f"{reason}, and --mode={mode} writes its results there. {READ_ONLY_FIX}")
  if not (workdir / RUN_CONFIG_FILE).is_file():
    raise app.UsageError(f"{reason}, and it holds no run ({RUN_CONFIG_FILE} is missing). {READ_ONLY_FIX}")
