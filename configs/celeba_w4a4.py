"""celeba at W4A4: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol: see configs/celeba.py.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ddim_celeba):
  python -m msfp_jax.main --config=configs/celeba_w4a4.py --workdir=runs/celeba_w4a4
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/celeba_w4a4.py:runlocal --workdir=/tmp/celeba_w4a4_local
"""
from configs import common
from configs import celeba


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  return celeba.benchmark_config(weight_bits=4, act_bits=4, runlocal=args.runlocal)
