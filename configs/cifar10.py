"""The cifar10 benchmark: its model, sampler and evaluation protocol (method.md section 8), at any bit setting.

CIFAR-10 32x32: DDPM (Ho et al.) EMA weights, DDIM 100 steps, eta 0, quadratic skip;
50k samples against CIFAR-10 train statistics.
Evaluation protocol (method.md section 8) pinned below; the first stage and class embedding stay FP.

The per-bit-setting files (cifar10_w4a4.py, cifar10_w6a6.py, cifar10_w4a8.py) call `benchmark_config`; this
file also works alone: --config=configs/cifar10.py:weight_bits=6,act_bits=6[,runlocal].
"""
from configs import common
from configs import ddpm_defaults as defaults


def benchmark_config(weight_bits: int, act_bits: int, runlocal: bool = False):
  config = defaults.get_config()
  config.model.path = "checkpoints/ddpm_cifar10"
  config.quant.weight_bits = int(weight_bits)
  config.quant.act_bits = int(act_bits)
  config.sampler.num_steps = 100
  config.sampler.eta = 0.0
  config.sampler.skip = "quad"
  config.evaluation.num_samples = 50000
  config.evaluation.reference = "reference_stats/cifar10_train.npz"  # CIFAR-10 train statistics
  if runlocal:
    common.apply_runlocal(config)
  return config


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, weight_bits=4, act_bits=4)
  return benchmark_config(args.weight_bits, args.act_bits, args.runlocal)
