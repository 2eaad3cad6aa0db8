"""One run per workdir: an exclusive `fcntl.flock` on DIR/run.lock that records its holder (pid, host, command).

A second process on the same workdir fails at once with a line naming the holder. The kernel drops the lock when
its holder dies, however it dies, so a lock file that still names a holder but is not locked is stale (a killed
run): it is taken over with a message naming the run that left it. A clean exit empties the file. In a
multi-host run only process 0 takes the lock (`enabled=False` on the others): the processes of one job share the
workdir by design. The main job (msfp_jax.run.job) and FP training (msfp_jax.train_fp) hold it for their runs.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import socket
import sys
import time
from collections.abc import Callable, Iterator

LOCK_FILE = "run.lock"


class WorkdirLockedError(ValueError):
  """Another live process holds the workdir's lock (a ValueError: the command line named a busy workdir)."""


def _describe(holder: dict) -> str:
  if not holder:
    return "another process (it recorded no pid yet)"
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if holder.get("since") else "?"
  text = f"pid {holder.get('pid')} on host {holder.get('host')} since {since}"
  if holder.get("command"):
    text += f" ({holder['command']})"
  return text


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, ValueError, TypeError, OverflowError):
    return True  # exists (another user's) or unreadable: do not claim it is dead
  return True


class WorkdirLock:
  """The lock of `workdir` (acquire/release, or use as a context manager)."""

  def __init__(self, workdir, *, enabled: bool = True, log: Callable[[str], None] | None = None):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self.enabled = enabled
    self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    self._fd: int | None = None

  def _read(self, fd: int) -> dict:
    try:
      text = os.pread(fd, 1 << 16, 0).decode(errors="replace").strip()
      return json.loads(text) if text else {}
    except (OSError, ValueError):
      return {"pid": "?", "host": "?", "command": "unreadable lock file"}

  def acquire(self) -> WorkdirLock:
    if not self.enabled or self._fd is not None:
      return self
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        # Nothing can be written here, so no second run can clash with this one.
        self._log(f"workdir lock: {self.path.parent} is not writable ({e.strerror}); running without a lock.")
        return self
      raise
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = self._read(fd)
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirLockedError(
          f"{self.path.parent} is in use by another run: {_describe(holder)} holds {self.path}. Wait for it to "
          "finish or stop it, or use another --workdir.") from None
    previous = self._read(fd)
    if previous:  # left by a run that ended without releasing it: killed, or its machine went down
      here = previous.get("host") == socket.gethostname()
      state = ("no longer running" if not _pid_alive(previous.get("pid")) else "its pid is in use again") if here \
          else "on another host, not holding it"
      self._log(f"workdir lock: taking over the stale lock of {_describe(previous)} ({state}).")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
              "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # an empty file: released cleanly (a non-empty unlocked one is stale)
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def hold(workdir, *, enabled: bool = True) -> Iterator[WorkdirLock]:
  """Holds the lock of `workdir` for the block (a no-op when not `enabled`, e.g. on processes other than 0)."""
  lock = WorkdirLock(workdir, enabled=enabled)
  with lock:
    yield lock
