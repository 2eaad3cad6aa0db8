"""The built-in CIFAR-10 model (msfp_jax/assets/cifar10_model): W4A4 mixup-sign FP + TALoRA (K=4) + DFA.

A 2.25M-parameter DDPM UNet of the ddpm-cifar10 family trained here (its MODEL_CARD.md), scored with FID /
sFID against the shipped CIFAR-10 statistics. FIDs are against the JPEG copy of CIFAR-10; they are not
comparable to published numbers.

Launch:
  python -m msfp_jax.main --config=configs/cifar10_builtin.py --workdir=runs/cifar10
Smallest variant (tests, smoke runs): --config=configs/cifar10_builtin.py:runlocal
"""
from msfp_jax.configs import common, default


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  config = default.get_config()
  common.set_fields(config, {
      "model.path": "builtin:cifar10",
      # The model card's protocol: DDIM 50 steps, eta 0; N = 1,000 samples per model.
      "sampler.num_steps": 50,
      "sampler.eta": 0.0,
      # The standard reference: all 50,000 CIFAR-10 training images (of the JPEG copy).
      "evaluation.reference": "builtin:cifar10-train",
      "evaluation.max_reference_images": 0,
      "evaluation.num_samples": 1000,
      "evaluation.batch_size": 100,
      "sample.num_images": 100,
  })
  if args.runlocal:
    common.apply_runlocal(config)
  return config
