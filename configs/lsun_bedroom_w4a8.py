"""lsun_bedroom at W4A8: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol: see configs/lsun_bedroom.py.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ldm4_lsun_bedroom):
  python -m msfp_jax.main --config=configs/lsun_bedroom_w4a8.py --workdir=runs/lsun_bedroom_w4a8
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/lsun_bedroom_w4a8.py:runlocal --workdir=/tmp/lsun_bedroom_w4a8_local
"""
from configs import common
from configs import lsun_bedroom


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  return lsun_bedroom.benchmark_config(weight_bits=4, act_bits=8, runlocal=args.runlocal)
