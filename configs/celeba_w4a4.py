"""celeba at W4A4: MSFP (mixup-sign FP) + TALoRA (K=4) + DFA.

CelebA 64x64: the DDIM authors' CelebA model (EMA), DDIM 100 steps, eta 0;
50k samples against CelebA train statistics.
Evaluation protocol (method.md section 8) pinned below; the first stage and class embedding stay FP.

Launch (after converting the public checkpoint: python -m msfp_jax.convert SRC checkpoints/ddim_celeba):
  python -m msfp_jax.main --config=configs/celeba_w4a4.py --workdir=runs/celeba_w4a4
Laptop-sized smoke run of the same pipeline:
  python -m msfp_jax.main --config=configs/celeba_w4a4.py:runlocal --workdir=/tmp/celeba_w4a4_local
"""
from configs import common
from configs import ddpm_defaults as defaults


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  config = defaults.get_config()
  config.model.path = "checkpoints/ddim_celeba"
  config.quant.weight_bits = 4
  config.quant.act_bits = 4
  config.sampler.num_steps = 100
  config.sampler.eta = 0.0
  config.sampler.skip = "uniform"
  config.evaluation.benchmark = "celeba"
  config.evaluation.num_samples = 50000
  config.evaluation.reference = "reference_stats/celeba_train.npz"  # CelebA train statistics
  if args.runlocal:
    common.apply_runlocal(config)
  return config
