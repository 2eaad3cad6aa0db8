"""Which sampler steps a quantized model's error comes from, against the weights the fine-tuning loss gives them.

  python -m msfp_jax.diagnostics.swap_in --config=configs/cifar10_builtin.py --workdir=runs/cifar10 \
      [--model=ptq|finetuned] [--block=10] [--num_images=64]

Samples from fixed noise with the FP model, then again with the quantized model of WORKDIR (its calibration,
or its fine-tuned checkpoint) swapped in for one block of steps at a time (evaluation.paired.swap_in_costs), and
writes WORKDIR/diagnostics/swap_in_<model>.json and .png: each block's share of the sample error beside the
share of the loss weight |gamma_t|, gamma_t^2 and plain MSE put on it. The audit's method for DFA's weights.
"""
from __future__ import annotations

import pathlib

from absl import app, flags
from ml_collections import config_flags

from msfp_jax import checkpoint, cli, diffusion
from msfp_jax.evaluation import paired
from msfp_jax.run.models import Models, sampler_eps


def run(config, workdir, model: str = "ptq", block: int = 10, num_images: int = 64) -> dict:
  if model not in ("ptq", "finetuned"):
    raise ValueError(f"--model must be ptq or finetuned, got {model!r}.")
  if block < 1 or num_images < 1:
    raise ValueError(f"--block and --num_images must be positive, got {block} and {num_images}.")
  workdir = pathlib.Path(workdir)
  models = Models(config, workdir)
  x_T, labels, rng = models.fixed_noise(num_images)
  eps = {name: sampler_eps(models.apply_fn(name), models.bundle, labels) for name in ("fp", model)}
  ts = diffusion.sampling_timesteps(models.schedule, models.sampler_config)
  gammas = diffusion.noise_coefficients(models.schedule, models.sampler_config)
  costs = paired.swap_in_costs(
      lambda eps_fn: diffusion.sample(eps_fn, x_T, models.schedule, models.sampler_config, rng),
      eps["fp"], eps[model], ts, gammas, block)
  costs.update(model=model, block=block, num_images=num_images, sampler=config.sampler.kind,
               steps=int(config.sampler.num_steps), seed=int(config.seed))
  out = workdir / "diagnostics"
  checkpoint.save_json(out / f"swap_in_{model}.json", costs)
  paired.plot_swap_in(costs, out / f"swap_in_{model}.png",
                      title=f"{model}: one block of {block} steps swapped in at a time ({num_images} samples)")
  for b in costs["blocks"]:
    shares = ", ".join(f"{w} {b['weight_share'][w]:.0%}" for w in paired.WEIGHTINGS)
    print(f"t {b['t_max']:4d}-{b['t_min']:4d}: cost {b['cost_share']:.0%} (sample MSE {b['sample_mse']:.3g}); "
          f"loss weight {shares}")
  print(f"all steps swapped: sample MSE {costs['all_steps_mse']:.3g}; sum over blocks "
        f"{costs['sum_of_blocks_mse']:.3g}")
  return costs


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  try:
    run(FLAGS.config, FLAGS.workdir, FLAGS.model, FLAGS.block, FLAGS.num_images)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":  # the flags are defined only when this is the program (see tests/test_imports.py)
  config_flags.DEFINE_config_file("config", None, "The run's config file (as given to msfp_jax.main).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The run's workdir (its calibration / fine-tuned checkpoint).")
  flags.DEFINE_enum("model", "ptq", ["ptq", "finetuned"], "The quantized model to swap in.")
  flags.DEFINE_integer("block", 10, "Consecutive sampler steps per block.")
  flags.DEFINE_integer("num_images", 64, "Samples from fixed noise.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
