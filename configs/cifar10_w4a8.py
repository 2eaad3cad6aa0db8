"""cifar10 at W4A8: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol: see configs/cifar10.py.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ddpm_cifar10):
  python -m msfp_jax.main --config=configs/cifar10_w4a8.py --workdir=runs/cifar10_w4a8
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/cifar10_w4a8.py:runlocal --workdir=/tmp/cifar10_w4a8_local
"""
from configs import common
from configs import cifar10


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  return cifar10.benchmark_config(weight_bits=4, act_bits=8, runlocal=args.runlocal)
