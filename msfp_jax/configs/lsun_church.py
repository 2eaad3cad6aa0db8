"""LSUN Church 256 at a bit setting given as the first argument: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol (method.md section 8): LDM-8 (KL-f8); DDIM 400 steps (Q-Diffusion used 500), eta 0; 50k samples
against LSUN Church statistics. The autoencoder stays in full precision; the UNet's input conv, time embedding
and output conv at 8 bits.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ldm8_lsun_church):
  python -m msfp_jax.main --config=configs/lsun_church.py:w4a4 --workdir=runs/lsun_church_w4a4
The paper's bit settings: w4a4 (also the default of plain configs/lsun_church.py), w6a6, w4a8.
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/lsun_church.py:w4a4,runlocal --workdir=/tmp/lsun_church_w4a4_local
"""
from msfp_jax.configs import common, ldm_defaults


def get_config(arg=None):
  return common.benchmark_config(arg, ldm_defaults.get_config(), {
      "model.path": "checkpoints/ldm8_lsun_church",
      "schedule.beta_start": 0.0015,
      "schedule.beta_end": 0.0155,  # LDM-8 church config
      "sampler.num_steps": 400,
      "sampler.eta": 0.0,
      "sampler.skip": "uniform",
      "evaluation.reference": "reference_stats/lsun_church.npz",  # LSUN Church statistics
  })
