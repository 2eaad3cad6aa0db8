"""Command-line plumbing shared by the absl tools (msfp_jax.main, msfp_jax.train_fp).

* `--config=configs/NAME.py[:ARG]` names a config of the package (msfp_jax/configs/NAME.py, CONFIGS) from any
  directory, also after `pip install`: a config path is the file relative to the current directory when it
  exists there, else the same path inside the package (configs/NAME.py), else inside the repository
  (msfp_jax/configs/NAME.py from another directory). Other repository-relative paths (the configs' default
  `evaluation.inception = .cache/fid/...`) are taken relative to the current directory when they exist there,
  else relative to the repository (REPO).
* Bad command lines end in one line on stderr ("error: ..."), never a traceback: an unknown config field is
  named with its near matches from the config, a config file that does not exist is named with where it was
  looked for, and an error raised inside a config file's get_config (an unknown `:arg`) is shown without the
  traceback ml_collections wraps around it.
"""
from __future__ import annotations

import difflib
import os
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

import ml_collections
from absl import flags

PACKAGE = pathlib.Path(__file__).resolve().parent
REPO = PACKAGE.parent  # the checkout (site-packages after a plain `pip install`)
CONFIGS = PACKAGE / "configs"

_TRACEBACK = "Traceback (most recent call last)"


class CommandLineError(Exception):
  """The command line cannot run; the message (one line) says what is wrong and how to fix it."""


def fail(message: str, exitcode: int = 1) -> NoReturn:
  """Ends the program with `error: message` on stderr (one line per line of the message, no traceback)."""
  sys.stdout.flush()
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  raise SystemExit(exitcode)


def resolve_repo_path(path: str | os.PathLike) -> pathlib.Path:
  """`path` itself when it exists (or is absolute, or names nothing in the repository either); else REPO/path.

  So a repository-relative path (.cache/fid/...) works from any working directory, while a path that exists
  relative to the working directory always means that file.
  """
  path = pathlib.Path(path).expanduser()
  if path.is_absolute() or path.exists():
    return path
  candidate = REPO / path
  return candidate if candidate.exists() else path


def resolve_config_path(path: str | os.PathLike) -> pathlib.Path:
  """`path` itself when it exists (or is absolute); else PACKAGE/path (configs/cifar10.py), else REPO/path
  (msfp_jax/configs/cifar10.py from another directory); else `path` as given, for the error to name."""
  path = pathlib.Path(path).expanduser()
  if path.is_absolute() or path.exists():
    return path
  for base in (PACKAGE, REPO):
    if (base / path).exists():
      return base / path
  return path


# A per-bit-setting file of before the bit setting became the benchmark config's first argument.
_BIT_SETTING_FILE = re.compile(r"(?P<benchmark>\w+)_(?P<bits>w\d+a\d+)\.py")


def _config_suggestions(path: str) -> str:
  configs = sorted(f"configs/{p.name}" for p in CONFIGS.glob("*.py") if p.name not in ("__init__.py", "common.py"))
  old_name = _BIT_SETTING_FILE.fullmatch(pathlib.PurePath(path).name)
  if old_name and f"configs/{old_name['benchmark']}.py" in configs:
    return (f" Did you mean configs/{old_name['benchmark']}.py:{old_name['bits']}? (The bit setting is the "
            "benchmark config's first argument.)")
  close = difflib.get_close_matches(pathlib.PurePath(path).as_posix(), configs, n=3, cutoff=0.6)
  if not close:  # compare file names only (a wrong folder)
    names = {pathlib.PurePath(c).name: c for c in configs}
    close = [names[n] for n in difflib.get_close_matches(pathlib.PurePath(path).name, list(names), n=3, cutoff=0.6)]
  return f" Did you mean {' or '.join(close)}?" if close else f" The configs are in {CONFIGS} (configs/NAME.py)."


def resolve_config_spec(spec: str, flag_name: str = "config") -> str:
  """`FILE.py[:ARG]` with FILE resolved by `resolve_config_path`; CommandLineError when the file does not exist."""
  path, sep, arg = spec.partition(":")
  if not path:
    raise CommandLineError(f"--{flag_name} is empty; give a config file, e.g. --{flag_name}=configs/default.py.")
  resolved = resolve_config_path(path)
  if not resolved.is_file():
    looked_in = list(dict.fromkeys(str(d) for d in (pathlib.Path.cwd(), PACKAGE, REPO)))
    where = (f"{resolved} is a directory, not a config file" if resolved.is_dir() else
             f"no such file {path}" + ("" if pathlib.Path(path).is_absolute() else
                                       f" (looked in {', '.join(looked_in[:-1])} and {looked_in[-1]})"))
    raise CommandLineError(f"--{flag_name}={spec}: {where}.{_config_suggestions(path)}")
  return str(resolved) + sep + arg


def resolve_config_argv(argv: Sequence[str], flag_name: str = "config") -> list[str]:
  """argv with the config file of `--config=FILE.py[:ARG]` (or `--config FILE.py[:ARG]`) resolved."""
  out = list(argv)
  i = 1
  while i < len(out):
    arg = out[i]
    if arg == "--":
      break
    for prefix in (f"--{flag_name}=", f"-{flag_name}="):
      if arg.startswith(prefix):
        out[i] = prefix + resolve_config_spec(arg[len(prefix):], flag_name)
        break
    else:
      if arg in (f"--{flag_name}", f"-{flag_name}") and i + 1 < len(out):
        out[i + 1] = resolve_config_spec(out[i + 1], flag_name)
        i += 1
    i += 1
  return out


def _field_paths(node, prefix: str = "") -> list[str]:
  """Every field path of a ConfigDict ("quant", "quant.act_bits", ...)."""
  paths = []
  for key in node.keys():
    path = f"{prefix}{key}"
    paths.append(path)
    value = node[key]
    if isinstance(value, ml_collections.ConfigDict):
      paths.extend(_field_paths(value, path + "."))
  return paths


def unknown_field_message(config, field_path: str, flag_name: str = "config") -> str | None:
  """A one-line message when `field_path` (e.g. "quant.act_bitz") names no field of `config`, else None.

  The message names the field and its near matches among the config's field paths (difflib).
  """
  node, parts = config, field_path.split(".")
  for i, part in enumerate(parts):
    if "[" in part:  # an index into a sequence field: left to ml_collections
      return None
    if isinstance(node, ml_collections.ConfigDict) and part in node:
      node = node[part]
      continue
    known = _field_paths(config)
    close = difflib.get_close_matches(field_path, known, n=3, cutoff=0.75)
    if not close:  # the right leaf name under another section (--config.act_bits for quant.act_bits)
      by_leaf: dict[str, list[str]] = {}
      for path in known:
        by_leaf.setdefault(path.rsplit(".", 1)[-1], []).append(path)
      for leaf in difflib.get_close_matches(parts[-1], list(by_leaf), n=2, cutoff=0.75):
        close.extend(by_leaf[leaf])
    parent = ".".join(parts[:i])
    if isinstance(node, ml_collections.ConfigDict):
      kind = "field" if i == len(parts) - 1 else "section"
      where = f"{flag_name}.{parent} has no {kind} {part!r}" if parent else f"the {flag_name} has no {kind} {part!r}"
    else:
      where = f"{flag_name}.{parent} is a field ({type(node).__name__}), not a section"
    hint = (f" Did you mean {' or '.join(f'--{flag_name}.{c}' for c in close[:3])}?" if close else
            (f" Its fields: {', '.join(sorted(node.keys()))}." if isinstance(node, ml_collections.ConfigDict)
             else ""))
    return f"Unknown config field --{flag_name}.{field_path}: {where}.{hint}"
  return None


def _override_paths(argv: Sequence[str], flag_name: str) -> list[str]:
  paths = []
  for arg in argv[1:]:
    if arg == "--":
      break
    for prefix in (f"--{flag_name}.", f"-{flag_name}."):
      if arg.startswith(prefix):
        paths.append(arg[len(prefix):].split("=", 1)[0])
  return paths


def _config_spec(argv: Sequence[str], flag, flag_name: str) -> str | None:
  spec = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    for prefix in (f"--{flag_name}=", f"-{flag_name}="):
      if arg.startswith(prefix):
        spec = arg[len(prefix):]
    if arg in (f"--{flag_name}", f"-{flag_name}") and i + 1 < len(argv):
      spec = argv[i + 1]
  if spec is None and isinstance(getattr(flag, "default_as_str", None), str):
    spec = flag.default_as_str.strip("'") or None
  return spec


def _one_line(message: str) -> str:
  """absl's flag error without the traceback ml_collections puts in it: the flag and the exception's last line."""
  if _TRACEBACK not in message:
    return " ".join(line.strip() for line in message.strip().splitlines() if line.strip())
  head = message.split(_TRACEBACK, 1)[0].strip()
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  last = lines[-1] if lines else ""
  head = head.replace("Error whilst parsing config file:", "").strip().rstrip(":").strip()
  if head.startswith("flag "):
    head = head[len("flag "):]
  return f"{head}: {last}" if head else last


def parse_flags_or_raise(argv: Sequence[str], flag_values=None, config_flag: str | None = "config",
                         default_config: str | None = None) -> list[str]:
  """Parses argv into `flag_values` (absl's FLAGS by default); CommandLineError with one line on bad input.

  `default_config`: the config file when argv names none. (A config flag defined with a default parses that
  default, overrides included, when it is defined: at import time, before any error can be reported. So the
  tools define it without a default and it is given here.)
  """
  flag_values = flags.FLAGS if flag_values is None else flag_values
  argv = list(argv)
  if config_flag is not None:
    if default_config is not None and _config_spec(argv, None, config_flag) is None:
      argv.insert(1, f"--{config_flag}={default_config}")
    argv = resolve_config_argv(argv, config_flag)
  try:
    remaining = flag_values(argv)
  except flags.Error as e:
    raise CommandLineError(_one_line(str(e))) from None
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections lets these escape absl for an override of a field that does not exist.
    message = None
    if config_flag is not None and config_flag in flag_values:
      message = _unknown_override(argv, flag_values[config_flag], config_flag)
    raise CommandLineError(message or _one_line(f"{type(e).__name__}: {e}".replace("\\n", "\n"))) from None
  if config_flag is not None and config_flag in flag_values:
    value = flag_values[config_flag].value
    if type(value).__name__ == "_ErrorConfig":  # ml_collections defers a load failure to the first access
      error = object.__getattribute__(value, "_error")
      raise CommandLineError(f"--{config_flag}: {_one_line(str(error))}")
  return remaining


def _unknown_override(argv: Sequence[str], flag, flag_name: str) -> str | None:
  spec = _config_spec(argv, flag, flag_name)
  if not spec:
    return None
  try:
    config = flag.parser.parse(resolve_config_spec(spec, flag_name))  # the file alone, without the overrides
  except Exception:  # pylint: disable=broad-except
    return None
  for path in _override_paths(argv, flag_name):
    message = unknown_field_message(config, path, flag_name)
    if message:
      return message
  return None


def parse_flags(argv: Sequence[str], *, default_config: str | None = None) -> list[str]:
  """The `flags_parser` for absl's app.run: bad flags end the program with one line."""
  try:
    return parse_flags_or_raise(argv, default_config=default_config)
  except CommandLineError as e:
    fail(str(e))
