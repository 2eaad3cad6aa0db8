"""lsun_bedroom at W4A4: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

LSUN Bedroom 256: LDM-4 (VQ-f4), EMA weights, DDIM 200 steps, eta 1;
50k samples against LSUN Bedroom statistics.
Evaluation protocol (method.md section 8) pinned below; the first stage and class embedding stay FP.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ldm4_lsun_bedroom):
  python -m msfp_jax.main --config=configs/lsun_bedroom_w4a4.py --workdir=runs/lsun_bedroom_w4a4
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/lsun_bedroom_w4a4.py:runlocal --workdir=/tmp/lsun_bedroom_w4a4_local
"""
from configs import common
from configs import ldm_defaults as defaults


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  config = defaults.get_config()
  config.model.path = "checkpoints/ldm4_lsun_bedroom"
  config.quant.weight_bits = 4
  config.quant.act_bits = 4
  config.sampler.num_steps = 200
  config.sampler.eta = 1.0
  config.sampler.skip = "uniform"
  config.evaluation.benchmark = "lsun_bedroom"
  config.evaluation.num_samples = 50000
  config.evaluation.reference = "reference_stats/lsun_bedroom.npz"  # LSUN Bedroom statistics
  if args.runlocal:
    common.apply_runlocal(config)
  return config
