"""The lsun_church benchmark: its model, sampler and evaluation protocol (method.md section 8), at any bit setting.

LSUN Church 256: LDM-8 (KL-f8), DDIM 400 steps (Q-Diffusion used 500), eta 0;
50k samples against LSUN Church statistics.
Evaluation protocol (method.md section 8) pinned below; the first stage and class embedding stay FP.

The per-bit-setting files (lsun_church_w4a4.py, lsun_church_w6a6.py, lsun_church_w4a8.py) call `benchmark_config`; this
file also works alone: --config=configs/lsun_church.py:weight_bits=6,act_bits=6[,runlocal].
"""
from configs import common
from configs import ldm_defaults as defaults


def benchmark_config(weight_bits: int, act_bits: int, runlocal: bool = False):
  config = defaults.get_config()
  config.model.path = "checkpoints/ldm8_lsun_church"
  config.quant.weight_bits = int(weight_bits)
  config.quant.act_bits = int(act_bits)
  config.schedule.beta_start = 0.0015
  config.schedule.beta_end = 0.0155  # LDM-8 church config
  config.sampler.num_steps = 400
  config.sampler.eta = 0.0
  config.sampler.skip = "uniform"
  config.evaluation.num_samples = 50000
  config.evaluation.reference = "reference_stats/lsun_church.npz"  # LSUN Church statistics
  if runlocal:
    common.apply_runlocal(config)
  return config


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, weight_bits=4, act_bits=4)
  return benchmark_config(args.weight_bits, args.act_bits, args.runlocal)
