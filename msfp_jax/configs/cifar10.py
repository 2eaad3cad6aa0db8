"""CIFAR-10 32x32 at a bit setting given as the first argument: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol (method.md section 8): DDPM (Ho et al.) EMA weights; DDIM 100 steps, eta 0, quadratic skip;
50k samples against CIFAR-10 train statistics. The first conv, time embedding and last conv stay at 8 bits.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ddpm_cifar10):
  python -m msfp_jax.main --config=configs/cifar10.py:w4a4 --workdir=runs/cifar10_w4a4
The paper's bit settings: w4a4 (also the default of plain configs/cifar10.py), w6a6, w4a8.
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/cifar10.py:w4a4,runlocal --workdir=/tmp/cifar10_w4a4_local
"""
from msfp_jax.configs import common, ddpm_defaults


def get_config(arg=None):
  return common.benchmark_config(arg, ddpm_defaults.get_config(), {
      "model.path": "checkpoints/ddpm_cifar10",
      "sampler.num_steps": 100,
      "sampler.eta": 0.0,
      "sampler.skip": "quad",
      "evaluation.reference": "reference_stats/cifar10_train.npz",  # CIFAR-10 train statistics
  })
