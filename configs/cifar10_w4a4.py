"""cifar10 at W4A4: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

CIFAR-10 32x32: DDPM (Ho et al.) EMA weights, DDIM 100 steps, eta 0, quadratic skip;
50k samples against CIFAR-10 train statistics.
Evaluation protocol (method.md section 8) pinned below; the first stage and class embedding stay FP.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ddpm_cifar10):
  python -m msfp_jax.main --config=configs/cifar10_w4a4.py --workdir=runs/cifar10_w4a4
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/cifar10_w4a4.py:runlocal --workdir=/tmp/cifar10_w4a4_local
"""
from configs import common
from configs import ddpm_defaults as defaults


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  config = defaults.get_config()
  config.model.path = "checkpoints/ddpm_cifar10"
  config.quant.weight_bits = 4
  config.quant.act_bits = 4
  config.sampler.num_steps = 100
  config.sampler.eta = 0.0
  config.sampler.skip = "quad"
  config.evaluation.benchmark = "cifar10"
  config.evaluation.num_samples = 50000
  config.evaluation.reference = "reference_stats/cifar10_train.npz"  # CIFAR-10 train statistics
  if args.runlocal:
    common.apply_runlocal(config)
  return config
