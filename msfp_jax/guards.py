"""Guards of the long training loops (fine-tuning, msfp_jax.train.finetune; FP training, msfp_jax.train_fp).

  * `DivergenceGuard`: a NaN / Inf loss, or a finite loss far above its running median (a learning rate too
    high sends the loss from 0.02 to 5e6 while staying finite), stops the run with `TrainingDivergedError`:
    one message naming the step, the loss, the last good checkpoint and the config fields to change. The loops
    also check the state they are about to save (its loss), so a diverged state is never checkpointed.
  * `interruptible`: SIGINT / SIGTERM are handled once. The first signal only sets a flag; the loop finishes the
    step (and a checkpoint save in progress), saves, prints "interrupted at step N; rerun the same command to
    resume" and raises `TrainingInterrupted` (a SystemExit: exit status 128 + the signal number, no
    traceback). A second signal abandons whatever is in progress at once: orbax writes a checkpoint under a
    temporary name and renames it when complete, so the last complete checkpoint stays the newest.

`TrainingDivergedError` is a ValueError, so the command line (msfp_jax.main) reports it as one line.
"""
from __future__ import annotations

import collections
import contextlib
import math
import os
import signal
import statistics
import sys
import threading
from collections.abc import Iterable, Iterator

DEFAULT_DIVERGENCE_FACTOR = 100.0
DEFAULT_WINDOW = 50


class TrainingDivergedError(ValueError):
  """The loss became NaN / Inf or rose far above its running median; nothing diverged was checkpointed."""


class DivergenceGuard:
  """Raises TrainingDivergedError when a loss is not finite or exceeds `factor` x the median of the last `window`
  accepted losses (factor <= 0 turns the median check off; NaN / Inf always stop the run).

  `hint` says what to change (config fields); it ends every message.
  """

  def __init__(self, factor: float = DEFAULT_DIVERGENCE_FACTOR, *, window: int = DEFAULT_WINDOW,
               what: str = "Training", hint: str = ""):
    self.factor = float(factor)
    self.what = what
    self.hint = hint
    self._history: collections.deque[float] = collections.deque(maxlen=max(int(window), 1))

  def seed(self, losses: Iterable[float]) -> None:
    """Fills the running window with losses logged before a resume (so the check starts at full strength)."""
    for loss in losses:
      if math.isfinite(loss):
        self._history.append(float(loss))

  def median(self) -> float | None:
    return float(statistics.median(self._history)) if self._history else None

  def problem(self, loss: float) -> str | None:
    """Why `loss` counts as diverged (None: it does not)."""
    if not math.isfinite(loss):
      return f"loss {loss}"
    median = self.median()
    if self.factor > 0 and median is not None and median > 0 and loss > self.factor * median:
      return f"loss {loss:.3g} is more than {self.factor:g} x its running median {median:.3g}"
    return None

  def check(self, step: int, loss: float, *, last_good: str, accept: bool = True, note: str = "") -> None:
    """Raises if `loss` (of `step`) diverged; otherwise adds it to the window (unless accept=False).

    `last_good` describes the last good checkpoint ("step 40 in DIR", or that none was written); `note` follows
    the loss in the message (e.g. which state it is the loss of)."""
    problem = self.problem(float(loss))
    if problem is not None:
      problem = f"{problem} {note}" if note else problem
      good = f"last good checkpoint: {last_good}" if not last_good.startswith("no ") else last_good
      raise TrainingDivergedError(f"{self.what} diverged at step {step}: {problem}. Nothing of it was saved; "
                                  f"{good}. {self.hint}".rstrip())
    if accept:
      self._history.append(float(loss))


class TrainingInterrupted(SystemExit):
  """SIGINT / SIGTERM stopped the loop after saving step `step`; `code` is 128 + the signal number."""

  def __init__(self, step: int, signum: int, message: str):
    super().__init__(128 + int(signum))
    self.step = int(step)
    self.signum = int(signum)
    self.message = message

  def __str__(self) -> str:
    return self.message


class Interrupts:
  """The signal state of one loop (see `interruptible`)."""

  def __init__(self, name: str):
    self.name = name
    self.signum: int | None = None
    self.activity = "the current step"  # what a second signal abandons, for its message
    self.resume_hint = ""               # e.g. "the newest checkpoint is step 40"

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame) -> None:
    del frame
    sig = signal.Signals(signum).name
    if self.signum is None:
      self.signum = signum
      print(f"\n[{self.name}] {sig}: stopping after {self.activity} (a checkpoint is saved first); send it again "
            "to stop at once.", file=sys.stderr, flush=True)
      return
    hint = f" {self.resume_hint}." if self.resume_hint else ""
    print(f"\n[{self.name}] second signal ({sig}): abandoned {self.activity}; what was not complete is not "
          f"used.{hint} Rerun the same command to resume.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + signum)  # pylint: disable=protected-access

  def stop(self, step: int) -> None:
    """Raises TrainingInterrupted for `step` (call after the state of `step` is saved), printing one line."""
    message = f"interrupted at step {step}; rerun the same command to resume"
    print(f"[{self.name}] {message}", file=sys.stderr, flush=True)
    raise TrainingInterrupted(step, self.signum or signal.SIGINT, message)


@contextlib.contextmanager
def interruptible(name: str, *, enabled: bool = True) -> Iterator[Interrupts]:
  """Handles SIGINT and SIGTERM for the block (first: set a flag; second: exit at once); restores the previous
  handlers after it. Off (a flag that is never set) outside the main thread or with enabled=False: in a
  multi-process job one process stopping alone would leave the others waiting in a collective."""
  state = Interrupts(name)
  if not enabled or threading.current_thread() is not threading.main_thread():
    yield state
    return
  previous = {s: signal.signal(s, state._handle) for s in (signal.SIGINT, signal.SIGTERM)}  # pylint: disable=protected-access
  try:
    yield state
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
