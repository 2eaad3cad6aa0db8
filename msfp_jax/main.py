"""msfp_jax command line: one experiment config, one workdir, one mode.

  python -m msfp_jax.main --workdir=runs/default            # the built-in model end to end (mode "all")
  python -m msfp_jax.main --config=configs/cifar10_w4a4.py --workdir=runs/cifar10_w4a4 --mode=finetune \
      --config.finetune.num_steps=100

--config takes ml_collections config files (`file.py:arg` selects a variant, e.g. `:runlocal`; default
configs/default.py); every field can be overridden with --config.a.b=value. Each stage writes its results to the
workdir and is skipped when they are there, so rerunning the same command resumes an interrupted job. A workdir
that holds a run of another config is refused. A config with an `ablation` section (configs/ablation.py) runs
the ablation table instead.
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

_CONFIG = config_flags.DEFINE_config_file("config", str(_REPO / "configs" / "default.py"),
                                          "Experiment config file (ml_collections).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this run's results (resumable).")
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


def check_workdir_config(config, workdir: pathlib.Path) -> None:
  """Refuses a workdir that holds a run of another config (naming the differences); records the config."""
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
  if _is_lead_process():
    checkpoint.save_json(path, current)


def _is_lead_process() -> bool:
  import jax
  return jax.process_index() == 0


def run(config, workdir, mode: str) -> None:
  """Runs one mode (or the whole pipeline) and records each stage's wall time in workdir/timings.json."""
  from msfp_jax import checkpoint
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if "ablation" in config:
    if mode not in ("all", "ablation"):
      raise app.UsageError("This config describes an ablation (it has an `ablation` section); run it with "
                           "--mode=all.")
    from msfp_jax import ablation
    ablation.run_ablation(config, workdir)
    return
  check_workdir_config(config, workdir)
  stages = PIPELINE if mode == "all" else (mode,)
  timings_path = workdir / "timings.json"
  shared: dict = {}
  for stage in stages:
    start = time.time()
    print(f"== stage {stage} ==", flush=True)
    MODES[stage](config, workdir, shared)
    if _is_lead_process() and stage != "report":
      # Stage times accumulate over resumed runs (a skipped stage adds ~0), so they count the work done.
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


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required, e.g. --workdir=runs/default.")
  if _MODE.value not in MODES and _MODE.value not in ("all", "ablation"):
    raise app.UsageError(f"Unknown --mode={_MODE.value!r}; choose one of {sorted(MODES) + ['all']}.")
  _enable_compilation_cache()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and clu log every save at INFO; progress is printed
  from msfp_jax.train import distributed
  distributed.maybe_initialize(config.get("distributed"))
  try:
    run(config, _WORKDIR.value, _MODE.value)
  except (FileNotFoundError, ValueError) as e:
    # Bad input (a missing file or stage result, a value out of range, a mismatched workdir): one clear line,
    # not a traceback from deep inside the library. --verbosity=1 shows the traceback.
    if flags.FLAGS["verbosity"].present:
      raise
    raise app.UsageError(f"{type(e).__name__}: {e}") from None


if __name__ == "__main__":
  app.run(main)
