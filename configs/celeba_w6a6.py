"""celeba at W6A6: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol: see configs/celeba.py.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ddim_celeba):
  python -m msfp_jax.main --config=configs/celeba_w6a6.py --workdir=runs/celeba_w6a6
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/celeba_w6a6.py:runlocal --workdir=/tmp/celeba_w6a6_local
"""
from configs import common
from configs import celeba


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  return celeba.benchmark_config(weight_bits=6, act_bits=6, runlocal=args.runlocal)
