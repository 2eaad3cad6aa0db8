"""Every experiment config loads, locks, accepts overrides of existing fields and rejects unknown ones."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import config_flags  # noqa: F401  (the loader main.py uses)
from ml_collections.config_flags import config_flags as _cf

from msfp_jax import evaluation
from msfp_jax.configs import common, ddpm_defaults

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "msfp_jax" / "configs"
CONFIG_FILES = sorted(p for p in CONFIGS.glob("*.py") if p.name not in ("common.py", "__init__.py"))
BIT_SETTINGS = {"w4a4": (4, 4), "w6a6": (6, 6), "w4a8": (4, 8)}
BENCHMARKS = {"cifar10": 100, "celeba": 100, "lsun_bedroom": 200, "lsun_church": 400, "imagenet": 20}


def _load(path: pathlib.Path, arg: str | None = None):
  spec = f"{path}:{arg}" if arg else str(path)
  return _cf.ConfigFileFlagParser(name="config").parse(spec)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_config_loads_and_locks(path):
  config = _load(path)
  if not hasattr(config, "lock"):
    pytest.fail(f"{path.name} does not return an ml_collections ConfigDict")
  config.lock()
  with pytest.raises(AttributeError):
    config.no_such_field = 1
  config.seed = 7  # existing fields stay overridable
  assert config.seed == 7
  if "finetune" in config:  # the quantization experiments (default_fp.py is the FP model's training config)
    with pytest.raises(AttributeError):
      config.finetune.no_such_field = 1


def test_every_benchmark_and_bit_setting_exists_with_its_protocol():
  for name, steps in BENCHMARKS.items():
    for tag, (w, a) in BIT_SETTINGS.items():
      config = _load(CONFIGS / f"{name}.py", tag)
      assert (config.quant.weight_bits, config.quant.act_bits) == (w, a)
      assert config.sampler.num_steps == steps
      assert config.evaluation.num_samples == 50000 and config.evaluation.reference
      assert config.lora.num_banks == 4 and config.finetune.dfa_weighting == "abs"
  assert _load(CONFIGS / "cifar10.py", "w4a4").sampler.skip == "quad"
  assert _load(CONFIGS / "lsun_bedroom.py", "w4a4").sampler.eta == 1.0
  imagenet = _load(CONFIGS / "imagenet.py", "w4a4")
  assert imagenet.sampler.guidance_scale == 3.0 and imagenet.evaluation.num_samples == 50_000
  # The protocol's 50 images per class: evaluation labels are balanced for class-conditional models.
  labels = evaluation.balanced_labels(imagenet.evaluation.num_samples, imagenet.model.num_classes, 0)
  assert set(np.bincount(labels)) == {50}
  assert "benchmark" not in imagenet.evaluation and "metrics" not in imagenet.evaluation  # read by nothing


def test_runlocal_variant_is_small_and_bad_arguments_fail():
  small = _load(CONFIGS / "cifar10.py", "w4a4,runlocal")
  full = _load(CONFIGS / "cifar10.py", "w4a4")
  assert small.finetune.num_steps < full.finetune.num_steps and small.sampler.num_steps <= 10
  assert small.quant.weight_bits == full.quant.weight_bits  # only budgets change
  with pytest.raises(ValueError, match="Unknown config argument"):
    _load(CONFIGS / "default.py", "nosuchthing")


def test_default_config_is_the_papers_method():
  config = _load(CONFIGS / "default.py")
  assert (config.quant.weight_bits, config.quant.act_bits, config.quant.sign_mode) == (4, 4, "search")
  assert config.lora.num_banks == 4 and config.finetune.dfa_weighting == "abs"
  assert config.quant.high_precision_bits == 8 and not config.quant.quantize_attention


def test_command_line_overrides_reach_the_config():
  code = ("import sys; sys.argv=['x','--config=msfp_jax/configs/default.py','--config.finetune.num_steps=3',"
          "'--config.lora.rank=5']\n"
          "from absl import flags\nfrom ml_collections import config_flags\n"
          "c = config_flags.DEFINE_config_file('config', lock_config=True)\nflags.FLAGS(sys.argv)\n"
          "print(c.value.finetune.num_steps, c.value.lora.rank)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.stdout.split() == ["3", "5"], out.stderr[-2000:]


def test_unknown_config_argument_is_one_line_naming_the_known_ones():
  with pytest.raises(ValueError) as error:
    common.parse_arg("runlokal", runlocal=False, seeds="0")
  message = str(error.value)
  assert "'runlokal'" in message and "known: runlocal, seeds." in message and "Did you mean 'runlocal'?" in message
  assert "\n" not in message
  with pytest.raises(ValueError, match=r"known: runlocal\.$"):
    common.parse_arg("zzz", runlocal=False)


def test_bit_setting_is_the_unnamed_first_argument_and_combines_with_runlocal():
  plain = _load(CONFIGS / "cifar10.py")
  assert plain.to_dict() == _load(CONFIGS / "cifar10.py", "w4a4").to_dict()  # no argument: W4A4
  assert _load(CONFIGS / "cifar10.py", "runlocal").to_dict() == _load(CONFIGS / "cifar10.py", "w4a4,runlocal").to_dict()
  for name in BENCHMARKS:
    for tag, bits in BIT_SETTINGS.items():
      small = _load(CONFIGS / f"{name}.py", f"{tag},runlocal")
      named = _load(CONFIGS / f"{name}.py", f"runlocal=true,bits={tag}")
      assert (small.quant.weight_bits, small.quant.act_bits) == bits and small.finetune.num_steps == 20
      assert small.to_dict() == named.to_dict()
  args = common.parse_arg("w6a6,runlocal", bits=("w4a4", common.parse_bits), runlocal=False)
  assert args.bits == (6, 6) and args.runlocal is True
  assert common.parse_arg("runlocal", bits=("w4a4", common.parse_bits), runlocal=False).bits == (4, 4)
  # Only the first token may be unnamed; a misspelt name in its place is reported as one, not as a bad value.
  with pytest.raises(ValueError, match="must come first"):
    common.parse_arg("runlocal,w6a6", bits=("w4a4", common.parse_bits), runlocal=False)
  with pytest.raises(ValueError, match=r"not a bit setting wNaM.*Did you mean 'runlocal'\?"):
    common.parse_arg("runlokal", bits=("w4a4", common.parse_bits), runlocal=False)
  with pytest.raises(ValueError, match="Config argument bits='w4x4'"):
    _load(CONFIGS / "cifar10.py", "bits=w4x4")
  # A first entry that is a boolean takes no unnamed value: an unknown word stays an unknown argument.
  with pytest.raises(ValueError, match="Unknown config argument 'w4a4'"):
    common.parse_arg("w4a4", runlocal=False)


@pytest.mark.parametrize("word", ["flase", "ture", "", "2", "on"])
def test_boolean_config_arguments_are_strict(word):
  with pytest.raises(ValueError) as error:
    common.parse_arg(f"runlocal={word}", runlocal=False)
  message = str(error.value)
  assert f"runlocal={word!r} is not a boolean" in message
  assert "true, 1, yes, false, 0, no" in message and "\n" not in message
  with pytest.raises(ValueError, match="is not a boolean"):
    _load(CONFIGS / "default.py", f"runlocal={word}")


def test_boolean_spellings():
  for word in ("true", "True", "1", "yes", "YES"):
    assert common.parse_arg(f"runlocal={word}", runlocal=False).runlocal is True
  for word in ("false", "False", "0", "no"):
    assert common.parse_arg(f"runlocal={word}", runlocal=True).runlocal is False
  assert common.parse_arg("runlocal", runlocal=False).runlocal is True  # the bare name
  assert _load(CONFIGS / "default.py", "runlocal=no").to_dict() == _load(CONFIGS / "default.py").to_dict()


def test_set_fields_refuses_a_field_the_config_lacks():
  config = ddpm_defaults.get_config()
  common.set_fields(config, {"sampler.num_steps": 7})
  assert config.sampler.num_steps == 7 and not config.is_locked
  with pytest.raises(KeyError):
    common.set_fields(config, {"sampler.num_stepz": 7})
  assert "num_stepz" not in config.sampler and not config.is_locked
