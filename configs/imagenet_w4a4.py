"""imagenet at W4A4: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol: see configs/imagenet.py.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ldm4_cin256_v2):
  python -m msfp_jax.main --config=configs/imagenet_w4a4.py --workdir=runs/imagenet_w4a4
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/imagenet_w4a4.py:runlocal --workdir=/tmp/imagenet_w4a4_local
"""
from configs import common
from configs import imagenet


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  return imagenet.benchmark_config(weight_bits=4, act_bits=4, runlocal=args.runlocal)
