"""Helpers shared by the config files (after big_vision's configs/common.py).

A config file's `get_config(arg=None)` receives what follows the colon of `--config=FILE.py:ARG`:
`--config=configs/cifar10.py:w4a4,runlocal` gives the laptop-sized variant of the W4A4 CIFAR-10 benchmark.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

# Spellings of a boolean config argument (compared lower-case). Anything else is an error: a typo such as
# `runlocal=flase` must not quietly run the full-size experiment.
TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")

# The bit settings of the paper's tables; `parse_bits` accepts any wNaM.
PAPER_BIT_SETTINGS = ("w4a4", "w6a6", "w4a8")


def _strict_bool(key: str, text: str) -> bool:
  word = text.strip().lower()
  if word in TRUE_WORDS:
    return True
  if word in FALSE_WORDS:
    return False
  raise ValueError(f"Config argument {key}={text!r} is not a boolean; write one of "
                   f"{', '.join(TRUE_WORDS + FALSE_WORDS)} (or the bare name {key!r} for true).")


def parse_bits(text: str) -> tuple[int, int]:
  """(weight_bits, act_bits) of a bit setting written wNaM, e.g. "w4a8" -> (4, 8)."""
  match = re.fullmatch(r"w(\d+)a(\d+)", text.strip().lower())
  if not match:
    raise ValueError(f"{text!r} is not a bit setting wNaM (N weight bits, M activation bits), e.g. "
                     f"{', '.join(PAPER_BIT_SETTINGS)}.")
  return int(match.group(1)), int(match.group(2))


def parse_arg(arg: str | None, **spec) -> ml_collections.ConfigDict:
  """Parses "[VALUE,]name,key=value,..." into a ConfigDict with one field per entry of `spec`.

  Each `spec` entry is the argument's default, whose type converts the text after `=` (booleans strictly:
  true/1/yes or false/0/no, any case), or a (default_text, convert) pair whose `convert` turns the text, or the
  default when the argument is not given, into the value.

  A bare name sets a boolean to True ("runlocal"). The first token may be a bare value, without its name, for
  the first `spec` entry when that entry is not a boolean (big_vision's unnamed first argument):
  `cifar10.py:w4a4,runlocal` with spec (bits=..., runlocal=False). Unknown names are an error naming the known
  ones.
  """
  entries = {key: _entry(value) for key, value in spec.items()}  # name -> (default, convert or None)
  defaults = {key: convert(default) if convert else default for key, (default, convert) in entries.items()}
  result = ml_collections.ConfigDict(defaults)
  first = next(iter(spec), None)
  unnamed_first = first if first is not None and not isinstance(defaults[first], bool) else None
  for position, token in enumerate(t.strip() for t in (arg or "").split(",")):
    if not token:
      continue
    key, sep, value = token.partition("=")
    key = key.strip()
    if position == 0 and unnamed_first and not sep and key not in spec:
      result[unnamed_first] = _convert(unnamed_first, token, entries[unnamed_first], spec)
      continue
    if key not in spec:
      hint = _did_you_mean(key, spec)
      if unnamed_first and not sep and _is_value_of(token, entries[unnamed_first]):
        hint = (f" A value of {unnamed_first!r} without its name must come first "
                f"(--config=FILE.py:{token},...), or name it ({unnamed_first}={token}).")
      raise ValueError(f"Unknown config argument {key!r} (after the colon of --config=FILE.py:ARG); known: "
                       f"{', '.join(sorted(spec)) or 'none'}.{hint}")
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...).")
      result[key] = True
    else:
      result[key] = _convert(key, value.strip(), entries[key], spec, named=True)
  return result


def _entry(value) -> tuple[Any, Callable[[str], Any] | None]:
  """A spec entry as (default, convert or None for "the default's type")."""
  if isinstance(value, tuple) and len(value) == 2 and callable(value[1]):
    return value
  return value, None


def _is_value_of(text: str, entry) -> bool:
  default, convert = entry
  try:
    (convert or type(default))(text)
  except ValueError:
    return False
  return True


def _typed(key: str, text: str, default):
  if isinstance(default, bool):
    return _strict_bool(key, text)
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(f"Config argument {key}={text!r} is not of type {type(default).__name__}.") from None


def _convert(key: str, text: str, entry, spec, named: bool = False) -> Any:
  """The value of argument `key` written `text`; for an unnamed token, an error that also considers a typo."""
  default, convert = entry
  try:
    return convert(text) if convert else _typed(key, text, default)
  except ValueError as e:
    if named:
      if convert is None:
        raise  # _typed's message names the argument
      raise ValueError(f"Config argument {key}={text!r}: {e}") from None
    raise ValueError(f"Config argument {text!r} is neither a known name (known: {', '.join(sorted(spec))}) nor "
                     f"a value of the unnamed first argument {key!r}: {e}{_did_you_mean(text, spec)}") from None


def _did_you_mean(word: str, names) -> str:
  close = difflib.get_close_matches(word, list(names), n=1, cutoff=0.6)
  return f" Did you mean {close[0]!r}?" if close else ""


def set_fields(config: ml_collections.ConfigDict, fields: Mapping[str, Any]) -> None:
  """Sets each dotted field of `fields` ("sampler.num_steps": 100) on `config`; a field it lacks is an error.

  (ml_collections' update_from_flattened_dict alone would add a misspelt leaf as a new field.)
  """
  was_locked = config.is_locked
  config.lock()
  try:
    config.update_from_flattened_dict(dict(fields))
  finally:
    if not was_locked:
      config.unlock()


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


def apply_runlocal_fp_training(config: ml_collections.ConfigDict) -> None:
  """Shrinks a full-precision training run (default_fp.py, cifar10_fp.py) to seconds: 2 steps of batch 4, a
  checkpoint and a log line every step, a 4-image sample grid of 3 steps. The files shrink their model."""
  config.train.batch_size = 4
  config.train.num_steps = 2
  config.train.warmup_steps = 1
  config.train.log_every = 1
  config.train.checkpoint_every = 1
  config.sample.num_samples = 4
  config.sample.num_steps = 3


def benchmark_config(arg: str | None, family: ml_collections.ConfigDict,
                     protocol: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """One of the paper's benchmarks at the bit setting `arg` names: MSFP + TALoRA (K=4) + DFA.

  `arg`: "[BITS][,runlocal]", BITS a wNaM bit setting (default w4a4; the paper reports w4a4, w6a6, w4a8).
  `family`: the model family's defaults (ddpm_defaults or ldm_defaults). `protocol`: what the benchmark file
  pins (dotted fields: model, sampler, reference statistics), set over the family's defaults.
  """
  args = parse_arg(arg, bits=(PAPER_BIT_SETTINGS[0], parse_bits), runlocal=False)
  family.quant.weight_bits, family.quant.act_bits = args.bits
  family.evaluation.num_samples = 50_000  # every benchmark of the paper scores 50k samples (method.md section 8)
  set_fields(family, protocol)
  if args.runlocal:
    apply_runlocal(family)
  return family
