"""lsun_church at W6A6: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

LSUN Church 256: LDM-8 (KL-f8), DDIM 400 steps (Q-Diffusion used 500), eta 0;
50k samples against LSUN Church statistics.
Evaluation protocol (method.md section 8) pinned below; the first stage and class embedding stay FP.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ldm8_lsun_church):
  python -m msfp_jax.main --config=configs/lsun_church_w6a6.py --workdir=runs/lsun_church_w6a6
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/lsun_church_w6a6.py:runlocal --workdir=/tmp/lsun_church_w6a6_local
"""
from configs import common
from configs import ldm_defaults as defaults


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  config = defaults.get_config()
  config.model.path = "checkpoints/ldm8_lsun_church"
  config.quant.weight_bits = 6
  config.quant.act_bits = 6
  config.schedule.beta_start = 0.0015
  config.schedule.beta_end = 0.0155  # LDM-8 church config
  config.sampler.num_steps = 400
  config.sampler.eta = 0.0
  config.sampler.skip = "uniform"
  config.evaluation.benchmark = "lsun_church"
  config.evaluation.num_samples = 50000
  config.evaluation.reference = "reference_stats/lsun_church.npz"  # LSUN Church statistics
  if args.runlocal:
    common.apply_runlocal(config)
  return config
