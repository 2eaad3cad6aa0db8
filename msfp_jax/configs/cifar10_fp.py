"""Training the built-in CIFAR-10 model (msfp_jax/assets/cifar10_model) in full precision.

The ddpm-cifar10 architecture family (Ho et al.: 32x32x3, eps prediction, linear betas, T = 1000,
ch_mult (1, 2, 2, 2), 2 ResBlocks per level, attention at 16x16) at a width a 2-core CPU can train:
ch = 32 and 8 GroupNorm groups keep 4 channels per group, as the real model's 128 / 32. Data: CIFAR-10
decoded from the JPEG archive (msfp_jax.data.cifar10; or tfds' own cifar10 with data.source=tfds).

Launch (resumable; train.stop_after_seconds ends a stretch with a checkpoint and an exported model):
  python -m msfp_jax.train_fp --config=configs/cifar10_fp.py --workdir=runs/cifar10_fp \\
      --config.data.archive=../shared/data/cifar10/cifar10-jpeg.tar.xz
The full-size ddpm-cifar10 (35.7M parameters, for a GPU): --config=configs/cifar10_fp.py:full
Tiny end-to-end variant (tests): --config=configs/cifar10_fp.py:runlocal
"""
from msfp_jax.configs import common, default_fp


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False, full=False)
  config = default_fp.get_config()
  config.data.name = "cifar10"
  config.data.archive = ""  # the JPEG archive; "" -> tfds' own cifar10 in data.data_dir
  config.data.source = "auto"

  config.model.config.update(dict(
      resolution=32, in_channels=3, out_channels=3, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
      attn_resolutions=(16,), dropout=0.0, num_groups=8))

  config.train.batch_size = 64
  config.train.num_steps = 100_000
  config.train.learning_rate = 5e-4
  config.train.warmup_steps = 200
  config.train.ema_decay = 0.999
  config.train.random_flip = True
  config.train.log_every = 50
  config.train.checkpoint_every = 250
  config.train.stop_after_seconds = 0.0  # 0: run to num_steps

  config.sample.num_samples = 100  # the 10x10 grid of the model card
  config.sample.num_steps = 50

  if args.full:  # Ho et al.'s model: 35,746,307 parameters, dropout 0.1 (not applied: see train_fp)
    config.model.config.update(dict(ch=128, num_groups=32))
    config.train.batch_size = 128
    config.train.learning_rate = 2e-4
    config.train.warmup_steps = 5000
    config.train.ema_decay = 0.9999
  if args.runlocal:
    config.model.config.update(dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=2))
    common.apply_runlocal_fp_training(config)
  return config
