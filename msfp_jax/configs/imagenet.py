"""ImageNet 256 at a bit setting given as the first argument: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

Protocol (method.md section 8): LDM-4 cin256-v2 (VQ-f4); DDIM 20 steps, eta 0, classifier-free guidance 3.0;
50k samples, 50 per class (msfp_jax.evaluation.balanced_labels), against ADM's VIRTUAL_imagenet256_labeled
statistics. The autoencoder and the class embedding stay in full precision.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ldm4_cin256_v2):
  python -m msfp_jax.main --config=configs/imagenet.py:w4a4 --workdir=runs/imagenet_w4a4
The paper's bit settings: w4a4 (also the default of plain configs/imagenet.py), w6a6, w4a8.
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/imagenet.py:w4a4,runlocal --workdir=/tmp/imagenet_w4a4_local
"""
from msfp_jax.configs import common, ldm_defaults


def get_config(arg=None):
  return common.benchmark_config(arg, ldm_defaults.get_config(), {
      "model.path": "checkpoints/ldm4_cin256_v2",
      "model.num_classes": 1000,
      "model.null_label": 1000,  # class 1000 = unconditional
      "sampler.num_steps": 20,
      "sampler.eta": 0.0,
      "sampler.skip": "uniform",
      "sampler.guidance_scale": 3.0,
      "evaluation.reference": "reference_stats/VIRTUAL_imagenet256_labeled.npz",  # ADM evaluator batch
  })
