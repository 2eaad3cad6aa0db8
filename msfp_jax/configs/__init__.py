"""The experiment configs (ml_collections): a default per model family and one file per experiment.

Each file's `get_config(arg=None)` builds one experiment; `arg` is what follows the colon of
`--config=configs/FILE.py:ARG` (parsed by `common.parse_arg`). The command-line tools find `configs/FILE.py`
inside this package from any directory (msfp_jax.cli.resolve_config_path), and each file's docstring carries
its launch command.

  ddpm_defaults, ldm_defaults   the defaults of the pixel-space DDPM and the latent-diffusion families
  cifar10, celeba, lsun_bedroom, lsun_church, imagenet
                                the paper's benchmarks; the bit setting is the first argument (cifar10.py:w4a4)
  default, cifar10_builtin      the built-in models (msfp_jax/assets), runnable on a CPU without downloads
  ablation                      the paper's ablation table on the default model
  default_fp, cifar10_fp        full-precision training of the built-in models (msfp_jax.train_fp)
  common                        parse_arg, runlocal shrinking, the shared benchmark builder
"""

__all__ = ["ablation", "celeba", "cifar10", "cifar10_builtin", "cifar10_fp", "common", "ddpm_defaults", "default",
           "default_fp", "imagenet", "ldm_defaults", "lsun_bedroom", "lsun_church"]
