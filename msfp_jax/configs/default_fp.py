"""Training the built-in default model (msfp_jax/assets/default_model) in full precision.

A small DDPM UNet (1 grey channel, 16x16, attention at 8x8) on sklearn's digits upscaled to 16x16
(msfp_jax.data.Digits16, a tfds builder of our own; nothing is downloaded). Sized to train within an
hour on a 2-core CPU.

Launch:
  python -m msfp_jax.train_fp --config=configs/default_fp.py --workdir=runs/default_fp
Tiny end-to-end variant (tests):
  python -m msfp_jax.train_fp --config=configs/default_fp.py:runlocal --workdir=/tmp/default_fp_local
Any field: --config.train.num_steps=4000
"""
import ml_collections

from msfp_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, runlocal=False)
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = "digits16"
  config.data.data_dir = ""  # "" -> WORKDIR/tfds

  config.model = ml_collections.ConfigDict()
  config.model.architecture = "ddpm_unet"
  config.model.config = ml_collections.ConfigDict(dict(
      resolution=16, in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2, 4), num_res_blocks=1,
      attn_resolutions=(8,), dropout=0.0, num_groups=8))

  config.schedule = ml_collections.ConfigDict(dict(kind="linear", num_timesteps=1000, beta_start=1e-4,
                                                   beta_end=0.02))

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 32
  config.train.num_steps = 3000
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 50
  config.train.grad_clip_norm = 1.0
  config.train.ema_decay = 0.995
  config.train.log_every = 25
  config.train.checkpoint_every = 100
  # A converted model (a path or builtin:NAME) to warm-start from when WORKDIR has no checkpoint: a new
  # machine goes on from the shipped weights (Adam's moments restart; see train_fp.warm_start).
  config.train.init_from = ""

  # The grid of samples written at the end (and the protocol of the shipped samples PNG).
  config.sample = ml_collections.ConfigDict(dict(num_samples=64, kind="ddim", num_steps=100, eta=0.0,
                                                 skip="uniform"))
  # Where to put the EMA weights as a converted model ("" -> WORKDIR/model).
  config.export_dir = ""

  if args.runlocal:
    config.model.config.update(dict(ch=8, ch_mult=(1, 2), num_groups=4))
    common.apply_runlocal_fp_training(config)
  return config
