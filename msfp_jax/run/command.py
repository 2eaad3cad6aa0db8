"""What `python -m msfp_jax.main` does with its flags: checks, then one run, and every refusal in one line.

In order: the workdir path (a file in the way is refused), whether the workdir is writable (a read-only one only
prints the report of its finished run: msfp_jax.run.report.report_read_only), JAX's persistent compilation
cache, the multi-process start (msfp_jax.train.distributed), then msfp_jax.run.job.run_job. Bad input (a
missing file, a value out of range, a workdir of another run, a file system that refuses a write) ends in one
line on stderr, `error: ...`; --verbosity=1 shows the traceback instead.

This module is light on purpose: the command line is parsed and the early refusals answer before the stages'
modules, and tensorflow with them (clu's summary writer, through msfp_jax.train), are imported.
"""
from __future__ import annotations

import errno
import os
import pathlib
import re
from collections.abc import Sequence

import jax
from absl import app, logging

from msfp_jax import cli
from msfp_jax.run import stage as stage_lib
from msfp_jax.run import workdir as workdir_lib

# The values of --mode: one stage, the whole pipeline, or the ablation table (a config with an `ablation`
# section runs it under "all" too).
MODES = (*stage_lib.PIPELINE, "all", "ablation")

# File-system refusals the user can fix (permissions, a read-only or full disk, a file in the way).
USER_OS_ERRORS = ("EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "EEXIST", "ENOTDIR", "EISDIR")

_ABSL_ENUM_ERROR = re.compile(r"flag --mode=(.*): value should be one of <.*>")


def parse_flags(argv: Sequence[str], *, default_config: str | None = None) -> list[str]:
  """The `flags_parser` of msfp_jax.main (msfp_jax.cli.parse_flags): bad flags end the program with one line, an
  unknown --mode in the words of the other refusals."""
  try:
    return cli.parse_flags_or_raise(argv, default_config=default_config)
  except cli.CommandLineError as e:
    message = str(e)
    unknown_mode = _ABSL_ENUM_ERROR.fullmatch(message)
    if unknown_mode:
      message = f"Unknown --mode={unknown_mode[1]!r}; choose one of {', '.join(MODES)}."
    cli.fail(message)


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache: a rerun or a resumed job skips most compile time (about 4x on CPU)."""
  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "msfp_jax" / "jax"))
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def is_user_error(e: Exception) -> bool:
  """Bad input, reported in one line: a missing file, a value out of range (ValueError, which the library's
  refusals derive from: a mismatched workdir, a diverged training, a busy workdir), a file-system refusal the
  user can fix. Anything else is a bug and keeps its traceback."""
  if isinstance(e, (FileNotFoundError, ValueError)):
    return True
  return isinstance(e, OSError) and e.errno in {getattr(errno, name) for name in USER_OS_ERRORS
                                                if hasattr(errno, name)}


def main(argv: Sequence[str], *, config, workdir: str | None, mode: str, verbose: bool = False) -> None:
  """Runs the command; every refusal ends in one line on stderr (`error: ...`), not absl's usage text or a
  traceback. `verbose` (--verbosity given): keep the library's log and the tracebacks."""
  try:
    _run(argv, config, workdir, mode, verbose)
  except app.UsageError as e:
    cli.fail(str(e), e.exitcode)


def _run(argv: Sequence[str], config, workdir: str | None, mode: str, verbose: bool) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
  if not workdir:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/default.")
  if mode not in MODES:  # absl checks the flag; this is for callers that pass a mode themselves
    raise app.UsageError(f"Unknown --mode={mode!r}; choose one of {', '.join(MODES)}.")
  workdir_lib.check_workdir_path(workdir)
  read_only = not workdir_lib.workdir_writable(workdir)
  if read_only:
    workdir_lib.check_read_only_mode(config, workdir, mode)
  enable_compilation_cache()
  if not verbose:
    logging.set_verbosity(logging.WARNING)  # orbax and clu log every save at INFO; progress is printed
  # The stages and the multi-process start import tensorflow (clu, through msfp_jax.train): only now, after the
  # command line and the workdir were accepted.
  from msfp_jax.run import (
    job,  # pylint: disable=g-import-not-at-top
    report,  # pylint: disable=g-import-not-at-top
  )
  from msfp_jax.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.maybe_initialize(config.get("distributed"))
  try:
    if read_only:
      report.report_read_only(config, workdir, mode)
    else:
      job.run_job(config, workdir, mode)
  except (FileNotFoundError, ValueError, OSError) as e:
    # One clear line, not a traceback from deep inside the library; --verbosity=1 shows it.
    if verbose or not is_user_error(e):
      raise
    raise app.UsageError(f"{type(e).__name__}: {e}") from None
