"""Every experiment config loads, locks, accepts overrides of existing fields and rejects unknown ones."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from ml_collections import config_flags  # noqa: F401  (the loader main.py uses)
from ml_collections.config_flags import config_flags as _cf

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
CONFIG_FILES = sorted(p for p in (REPO / "configs").glob("*.py") if p.name not in ("common.py", "__init__.py"))
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
    for tag, (w, a) in {"w4a4": (4, 4), "w6a6": (6, 6), "w4a8": (4, 8)}.items():
      config = _load(REPO / "configs" / f"{name}_{tag}.py")
      assert (config.quant.weight_bits, config.quant.act_bits) == (w, a)
      assert config.sampler.num_steps == steps
      assert config.evaluation.num_samples == 50000 and config.evaluation.reference
      assert config.lora.num_banks == 4 and config.finetune.dfa_weighting == "abs"
  assert _load(REPO / "configs" / "cifar10_w4a4.py").sampler.skip == "quad"
  assert _load(REPO / "configs" / "lsun_bedroom_w4a4.py").sampler.eta == 1.0
  imagenet = _load(REPO / "configs" / "imagenet_w4a4.py")
  assert imagenet.sampler.guidance_scale == 3.0 and imagenet.evaluation.num_samples == 50_000
  # The protocol's 50 images per class: evaluation labels are balanced for class-conditional models.
  from msfp_jax import eval as eval_lib
  labels = eval_lib.balanced_labels(imagenet.evaluation.num_samples, imagenet.model.num_classes, 0)
  assert set(np.bincount(labels)) == {50}
  assert "benchmark" not in imagenet.evaluation and "metrics" not in imagenet.evaluation  # read by nothing


def test_runlocal_variant_is_small_and_bad_arguments_fail():
  small = _load(REPO / "configs" / "cifar10_w4a4.py", "runlocal")
  full = _load(REPO / "configs" / "cifar10_w4a4.py")
  assert small.finetune.num_steps < full.finetune.num_steps and small.sampler.num_steps <= 10
  assert small.quant.weight_bits == full.quant.weight_bits  # only budgets change
  with pytest.raises(ValueError, match="Unknown config argument"):
    _load(REPO / "configs" / "default.py", "nosuchthing")


def test_default_config_is_the_papers_method():
  config = _load(REPO / "configs" / "default.py")
  assert (config.quant.weight_bits, config.quant.act_bits, config.quant.sign_mode) == (4, 4, "search")
  assert config.lora.num_banks == 4 and config.finetune.dfa_weighting == "abs"
  assert config.quant.high_precision_bits == 8 and not config.quant.quantize_attention


def test_command_line_overrides_reach_the_config():
  code = ("import sys; sys.argv=['x','--config=configs/default.py','--config.finetune.num_steps=3',"
          "'--config.lora.rank=5']\n"
          "from absl import flags\nfrom ml_collections import config_flags\n"
          "c = config_flags.DEFINE_config_file('config', lock_config=True)\nflags.FLAGS(sys.argv)\n"
          "print(c.value.finetune.num_steps, c.value.lora.rank)")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.stdout.split() == ["3", "5"], out.stderr[-2000:]


def test_unknown_config_argument_is_one_line_naming_the_known_ones():
  from configs import common
  with pytest.raises(ValueError) as error:
    common.parse_arg("runlokal", runlocal=False, seeds="0")
  message = str(error.value)
  assert "'runlokal'" in message and "known: runlocal, seeds." in message and "Did you mean 'runlocal'?" in message
  assert "\n" not in message
  with pytest.raises(ValueError, match=r"known: runlocal\.$"):
    common.parse_arg("zzz", runlocal=False)
