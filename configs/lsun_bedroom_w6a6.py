"""lsun_bedroom at W6A6: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol: see configs/lsun_bedroom.py.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ldm4_lsun_bedroom):
  python -m msfp_jax.main --config=configs/lsun_bedroom_w6a6.py --workdir=runs/lsun_bedroom_w6a6
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/lsun_bedroom_w6a6.py:runlocal --workdir=/tmp/lsun_bedroom_w6a6_local
"""
from configs import common
from configs import lsun_bedroom


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  return lsun_bedroom.benchmark_config(weight_bits=6, act_bits=6, runlocal=args.runlocal)
