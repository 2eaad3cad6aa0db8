"""The lsun_bedroom benchmark: its model, sampler and evaluation protocol (method.md section 8), at any bit setting.

LSUN Bedroom 256: LDM-4 (VQ-f4), EMA weights, DDIM 200 steps, eta 1;
50k samples against LSUN Bedroom statistics.
Evaluation protocol (method.md section 8) pinned below; the first stage and class embedding stay FP.

The per-bit-setting files (lsun_bedroom_w4a4.py, lsun_bedroom_w6a6.py, lsun_bedroom_w4a8.py) call `benchmark_config`; this
file also works alone: --config=configs/lsun_bedroom.py:weight_bits=6,act_bits=6[,runlocal].
"""
from configs import common
from configs import ldm_defaults as defaults


def benchmark_config(weight_bits: int, act_bits: int, runlocal: bool = False):
  config = defaults.get_config()
  config.model.path = "checkpoints/ldm4_lsun_bedroom"
  config.quant.weight_bits = int(weight_bits)
  config.quant.act_bits = int(act_bits)
  config.sampler.num_steps = 200
  config.sampler.eta = 1.0
  config.sampler.skip = "uniform"
  config.evaluation.num_samples = 50000
  config.evaluation.reference = "reference_stats/lsun_bedroom.npz"  # LSUN Bedroom statistics
  if runlocal:
    common.apply_runlocal(config)
  return config


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, weight_bits=4, act_bits=4)
  return benchmark_config(args.weight_bits, args.act_bits, args.runlocal)
