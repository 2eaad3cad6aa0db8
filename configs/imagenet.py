"""The imagenet benchmark: its model, sampler and evaluation protocol (method.md section 8), at any bit setting.

ImageNet 256: LDM-4 cin256-v2 (VQ-f4), DDIM 20 steps, eta 0, classifier-free guidance 3.0;
50k samples, 50 per class, against ADM's VIRTUAL_imagenet256_labeled statistics.
Evaluation protocol (method.md section 8) pinned below; the first stage and class embedding stay FP.

The per-bit-setting files (imagenet_w4a4.py, imagenet_w6a6.py, imagenet_w4a8.py) call `benchmark_config`; this
file also works alone: --config=configs/imagenet.py:weight_bits=6,act_bits=6[,runlocal].
"""
from configs import common
from configs import ldm_defaults as defaults


def benchmark_config(weight_bits: int, act_bits: int, runlocal: bool = False):
  config = defaults.get_config()
  config.model.path = "checkpoints/ldm4_cin256_v2"
  config.quant.weight_bits = int(weight_bits)
  config.quant.act_bits = int(act_bits)
  config.model.num_classes = 1000
  config.model.null_label = 1000  # class 1000 = unconditional
  config.sampler.num_steps = 20
  config.sampler.eta = 0.0
  config.sampler.skip = "uniform"
  config.sampler.guidance_scale = 3.0
  config.evaluation.num_samples = 50000
  # Class labels are balanced (msfp_jax.eval.balanced_labels): 50 per class for 50,000 samples.
  config.evaluation.reference = "reference_stats/VIRTUAL_imagenet256_labeled.npz"  # ADM evaluator batch
  if runlocal:
    common.apply_runlocal(config)
  return config


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, weight_bits=4, act_bits=4)
  return benchmark_config(args.weight_bits, args.act_bits, args.runlocal)
