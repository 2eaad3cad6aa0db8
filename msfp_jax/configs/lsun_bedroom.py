"""LSUN Bedroom 256 at a bit setting given as the first argument: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol (method.md section 8): LDM-4 (VQ-f4), EMA weights; DDIM 200 steps, eta 1; 50k samples against LSUN
Bedroom statistics. The autoencoder stays in full precision; the UNet's input conv, time embedding and output
conv at 8 bits.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ldm4_lsun_bedroom):
  python -m msfp_jax.main --config=configs/lsun_bedroom.py:w4a4 --workdir=runs/lsun_bedroom_w4a4
The paper's bit settings: w4a4 (also the default of plain configs/lsun_bedroom.py), w6a6, w4a8.
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/lsun_bedroom.py:w4a4,runlocal --workdir=/tmp/lsun_bedroom_w4a4_local
"""
from msfp_jax.configs import common, ldm_defaults


def get_config(arg=None):
  return common.benchmark_config(arg, ldm_defaults.get_config(), {
      "model.path": "checkpoints/ldm4_lsun_bedroom",
      "sampler.num_steps": 200,
      "sampler.eta": 1.0,
      "sampler.skip": "uniform",
      "evaluation.reference": "reference_stats/lsun_bedroom.npz",  # LSUN Bedroom statistics
  })
