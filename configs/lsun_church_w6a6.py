"""lsun_church at W6A6: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol: see configs/lsun_church.py.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ldm8_lsun_church):
  python -m msfp_jax.main --config=configs/lsun_church_w6a6.py --workdir=runs/lsun_church_w6a6
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/lsun_church_w6a6.py:runlocal --workdir=/tmp/lsun_church_w6a6_local
"""
from configs import common
from configs import lsun_church


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  return lsun_church.benchmark_config(weight_bits=6, act_bits=6, runlocal=args.runlocal)
