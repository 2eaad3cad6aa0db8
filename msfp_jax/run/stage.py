"""The Stage type and the runner of a sequence of stages, with the skip and the time accounting of every stage.

A stage reads what earlier stages left in the workdir and writes its own results there. The runner skips a
stage whose results are current (`Stage.is_done`), so rerunning a command resumes an interrupted job and a
finished one recomputes nothing; it adds a stage's wall time to WORKDIR/timings.json only when the stage changed
its results (`Stage.outputs`), so the times count the work done, summed over resumed runs.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from msfp_jax import checkpoint
from msfp_jax.run import workdir as workdir_lib

TIMINGS_FILE = "timings.json"

# The main job's stages in the order --mode=all runs them. msfp_jax.run.job defines each; the names are here so
# that the command line checks --mode without importing the stages (and jax, orbax, tensorflow with them).
PIPELINE = ("calibrate", "finetune", "sample", "eval", "export", "report")


def never_done(config, workdir: pathlib.Path) -> bool:
  """The done-check of a stage that always runs (its run decides what is left to do)."""
  del config, workdir
  return False


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
  """One step of a job.

  name:       what --mode calls it.
  run:        run(config, workdir, context) does the stage's work; `context` is what the stages of one run
              share (msfp_jax.run.models.Context: the loaded models).
  is_done:    is_done(config, workdir): its results in workdir are current for `config` (the runner skips it).
  depends_on: the stages whose results it reads (they run before it).
  outputs:    the files and folders (relative to the workdir) it writes when it does work.
  """
  name: str
  run: Callable[[Any, pathlib.Path, Any], Any]
  is_done: Callable[[Any, pathlib.Path], bool] = never_done
  depends_on: tuple[str, ...] = ()
  outputs: tuple[str, ...] = ()


def check_order(stages: Sequence[Stage]) -> None:
  """Every stage comes after the stages it depends on."""
  seen: set[str] = set()
  for stage in stages:
    missing = [name for name in stage.depends_on if name not in seen]
    if missing:
      raise ValueError(f"stage {stage.name!r} runs before {missing}, which it depends on.")
    seen.add(stage.name)


def outputs_fingerprint(workdir: pathlib.Path, outputs: Sequence[str]) -> tuple:
  """(name, size, mtime) of each file of `outputs`, and of each entry of each folder (a new checkpoint step is a
  new entry)."""
  found = []
  for name in outputs:
    path = workdir / name
    entries = sorted(path.iterdir()) if path.is_dir() else [path]
    for entry in entries:
      try:
        stat = entry.stat()
      except OSError:
        continue
      found.append((str(entry.relative_to(workdir)), stat.st_size, stat.st_mtime_ns))
  return tuple(found)


def run_stages(stages: Sequence[Stage], config, workdir: pathlib.Path, context) -> None:
  """Runs `stages` in order in `workdir`, skipping those whose results are current."""
  workdir = pathlib.Path(workdir)
  timings_path = workdir / TIMINGS_FILE
  for stage in stages:
    print(f"== stage {stage.name} ==", flush=True)
    if stage.is_done(config, workdir):
      logging.info("%s: its results in %s are current, skipping", stage.name, workdir)
      continue
    start = time.time()
    before = outputs_fingerprint(workdir, stage.outputs)
    stage.run(config, workdir, context)
    if workdir_lib.is_lead_process() and outputs_fingerprint(workdir, stage.outputs) != before:
      # A stage that found nothing to do (it wrote nothing) adds no time: the times count the work done.
      timings = checkpoint.load_json(timings_path) if timings_path.is_file() else {}
      timings[stage.name] = round(timings.get(stage.name, 0.0) + time.time() - start, 2)
      checkpoint.save_json(timings_path, timings)
