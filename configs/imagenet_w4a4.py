"""imagenet at W4A4: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

ImageNet 256: LDM-4 cin256-v2 (VQ-f4), DDIM 20 steps, eta 0, classifier-free guidance 3.0;
50k samples, 50 per class, against ADM's VIRTUAL_imagenet256_labeled statistics.
Evaluation protocol (method.md section 8) pinned below; the first stage and class embedding stay FP.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ldm4_cin256_v2):
  python -m msfp_jax.main --config=configs/imagenet_w4a4.py --workdir=runs/imagenet_w4a4
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/imagenet_w4a4.py:runlocal --workdir=/tmp/imagenet_w4a4_local
"""
from configs import common
from configs import ldm_defaults as defaults


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  config = defaults.get_config()
  config.model.path = "checkpoints/ldm4_cin256_v2"
  config.quant.weight_bits = 4
  config.quant.act_bits = 4
  config.model.num_classes = 1000
  config.model.null_label = 1000  # class 1000 = unconditional
  config.sampler.num_steps = 20
  config.sampler.eta = 0.0
  config.sampler.skip = "uniform"
  config.sampler.guidance_scale = 3.0
  config.evaluation.benchmark = "imagenet"
  config.evaluation.num_samples = 50000
  config.evaluation.samples_per_class = 50
  config.evaluation.reference = "reference_stats/VIRTUAL_imagenet256_labeled.npz"  # ADM evaluator batch
  if args.runlocal:
    common.apply_runlocal(config)
  return config
