"""msfp_jax command line: one experiment config, one workdir, one mode.

  python -m msfp_jax.main --config=configs/default.py --workdir=runs/default --mode=finetune \
      --config.finetune.num_steps=100

--config takes ml_collections config files (`file.py:arg` selects a variant, e.g. `:runlocal`); every field
can be overridden with --config.a.b=value. Modes are a small table of functions (config, workdir) -> None.
"""
from __future__ import annotations

from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (ml_collections).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this run's results (resumable).")
_MODE = flags.DEFINE_string("mode", "finetune", "Stage to run; see MODES.")


def _calibrate(config, workdir) -> None:
  from msfp_jax.train import calibration
  calibration.run_calibration(config, workdir)


def _finetune(config, workdir) -> None:
  from msfp_jax.train import finetune
  result = finetune.finetune(config, workdir)
  logging.info("fine-tuning finished at step %d (last loss %s)", result.step, result.last_loss)


MODES: dict[str, Callable] = {
    "calibrate": _calibrate,
    "finetune": _finetune,
}


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/default.py")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required.")
  if _MODE.value not in MODES:
    raise app.UsageError(f"Unknown --mode={_MODE.value!r}; choose one of {sorted(MODES)}.")
  from msfp_jax.train import distributed
  distributed.maybe_initialize(config.get("distributed"))
  MODES[_MODE.value](config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
