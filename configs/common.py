"""Helpers shared by the config files (after big_vision's configs/common.py).

A config file's `get_config(arg=None)` receives what follows the colon of `--config=FILE.py:ARG`:
`--config=configs/cifar10_w4a4.py:runlocal` gives the laptop-sized variant of that experiment.
"""
from __future__ import annotations

import difflib

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "runlocal,key=value,..." into a ConfigDict over `defaults` (types follow the defaults).

  A bare word sets a boolean default to True ("runlocal"). Unknown keys are an error.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  for token in filter(None, (arg or "").split(",")):
    key, sep, value = token.partition("=")
    key = key.strip()
    if key not in defaults:
      close = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.6)
      raise ValueError(f"Unknown config argument {key!r} (after the colon of --config=FILE.py:ARG); known: "
                       f"{', '.join(sorted(defaults)) or 'none'}." + (f" Did you mean {close[0]!r}?" if close else ""))
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...).")
      result[key] = True
    elif isinstance(default, bool):
      result[key] = value.strip().lower() in ("1", "true", "yes")
    else:
      result[key] = type(default)(value)
  return result


def apply_runlocal(config: ml_collections.ConfigDict) -> None:
  """Shrinks an experiment to minutes on a laptop CPU: few samples and steps, short trajectories.

  The model stays what the experiment names; only budgets change (so the pipeline is exercised end to end).
  """
  config.sampler.num_steps = min(config.sampler.num_steps, 10)
  config.calibration.num_samples = 4
  config.calibration.batch_size = 4
  config.calibration.num_timesteps = 4
  config.finetune.num_steps = 20
  config.finetune.batch_size = 2
  config.finetune.log_every = 1
  config.finetune.checkpoint_every = 10
  config.evaluation.num_samples = 16
  config.evaluation.batch_size = 8
