"""lsun_church at W4A8: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol: see configs/lsun_church.py.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ldm8_lsun_church):
  python -m msfp_jax.main --config=configs/lsun_church_w4a8.py --workdir=runs/lsun_church_w4a8
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/lsun_church_w4a8.py:runlocal --workdir=/tmp/lsun_church_w4a8_local
"""
from configs import common
from configs import lsun_church


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  return lsun_church.benchmark_config(weight_bits=4, act_bits=8, runlocal=args.runlocal)
