"""Faults injected into a training loop (fine-tuning, FP training) at a chosen step: a kill, a signal; and a
checkpoint step damaged on disk.

The fakes wrap the real functions, so the run up to the fault is the real one; the tests undo them with
monkeypatch before resuming.
"""
import os
import pathlib
import signal


class Killed(BaseException):
  """Stands for SIGKILL: nothing after it runs (not even `except Exception` handlers)."""


def kill() -> None:
  raise Killed()


def send_sigterm() -> None:
  os.kill(os.getpid(), signal.SIGTERM)


def progress_with_fault(real_progress, step: int, fault=kill):
  """A stand-in for `metrics.progress` whose reporter reports as the real one does, then calls `fault()` once
  step `step` is reported (the step is done and logged; its checkpoint, if due, is not yet written)."""

  def progress(total, writer=None, **kw):
    reporter = real_progress(total, writer, **kw)

    class Faulty:
      def report(self, done):
        reporter.report(done)
        if done == step:
          fault()
    return Faulty()
  return progress


def save_with_fault(real_save, step: int, fault=kill):
  """A stand-in for `CheckpointManager.save` that calls `fault()` instead of saving step `step` (a kill inside
  the save, after the step was logged)."""

  def save(self, save_step, state, **kw):
    if save_step == step:
      fault()
    return real_save(self, save_step, state, **kw)
  return save


def truncate_checkpoint_data(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """Cuts every array-data file of the saved state (ocdbt's `d/` folders) to half its size.

  Only the data files: the largest file of the state is sometimes its `_METADATA` (the tree's JSON, which compresses
  less than the arrays), and a restore against a target does not read it, so cutting it proves nothing."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, f"no ocdbt data files under {step_dir / 'state'}"
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(path.stat().st_size // 2)
  return files
