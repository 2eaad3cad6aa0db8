"""cifar10 at W6A6: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol: see configs/cifar10.py.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ddpm_cifar10):
  python -m msfp_jax.main --config=configs/cifar10_w6a6.py --workdir=runs/cifar10_w6a6
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/cifar10_w6a6.py:runlocal --workdir=/tmp/cifar10_w6a6_local
"""
from configs import common
from configs import cifar10


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  return cifar10.benchmark_config(weight_bits=6, act_bits=6, runlocal=args.runlocal)
