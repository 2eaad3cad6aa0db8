"""CelebA 64x64 at a bit setting given as the first argument: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol (method.md section 8): the DDIM authors' CelebA model (EMA); DDIM 100 steps, eta 0, uniform skip;
50k samples against CelebA train statistics. The first conv, time embedding and last conv stay at 8 bits.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ddim_celeba):
  python -m msfp_jax.main --config=configs/celeba.py:w4a4 --workdir=runs/celeba_w4a4
The paper's bit settings: w4a4 (also the default of plain configs/celeba.py), w6a6, w4a8.
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/celeba.py:w4a4,runlocal --workdir=/tmp/celeba_w4a4_local
"""
from msfp_jax.configs import common, ddpm_defaults


def get_config(arg=None):
  return common.benchmark_config(arg, ddpm_defaults.get_config(), {
      "model.path": "checkpoints/ddim_celeba",
      "sampler.num_steps": 100,
      "sampler.eta": 0.0,
      "sampler.skip": "uniform",
      "evaluation.reference": "reference_stats/celeba_train.npz",  # CelebA train statistics
  })
