"""Which sampler steps a quantized model's error comes from, against the weights the fine-tuning loss gives them.

  python -m msfp_jax.diagnostics.swap_in --config=configs/cifar10_builtin.py --workdir=runs/cifar10 \
      [--model=ptq|finetuned] [--block=10] [--num_images=64] [--seeds=0,1,2]

For each seed, samples (decoded and clipped to [-1, 1], as they are scored) from that seed's fixed noise with the
FP model, then again with the quantized model of WORKDIR (its calibration, or its fine-tuned checkpoint) swapped
in for one block of steps at a time (evaluation.paired.swap_in_costs). Writes WORKDIR/diagnostics/swap_in_<model>
.json and .png: each block's share of the sample error (mean +- std over the seeds, and per seed) beside the share
of the loss weight |gamma_t|, gamma_t^2 and plain MSE put on it. The audit's method for DFA's weights.
"""
from __future__ import annotations

import pathlib

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from msfp_jax import checkpoint, cli, diffusion
from msfp_jax.evaluation import paired
from msfp_jax.run.models import Models, sampler_eps


def _images(models: Models, eps_fn, x_T, rng) -> np.ndarray:
  """The samples as they are scored (decoded, clipped to [-1, 1]): an unclipped sample of an under-trained model
  can lie far outside the image range, where the error means nothing."""
  return np.clip(models.decode(diffusion.sample(eps_fn, x_T, models.schedule, models.sampler_config, rng)), -1, 1)


def _over_seeds(per_seed: list[dict]) -> dict:
  """The per-seed swap-in costs as one: each block's sample MSE and cost share as mean and std (ddof 1) over the
  seeds, the weight shares (the same for every seed), and every seed's own numbers."""
  blocks = []
  for i, first in enumerate(per_seed[0]["blocks"]):
    block = {k: first[k] for k in ("t_max", "t_min", "steps", "weight_share")}
    for key in ("sample_mse", "cost_share"):
      values = [costs["blocks"][i][key] for costs in per_seed]
      block[key] = float(np.mean(values))
      block[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
      block[f"{key}_per_seed"] = values
    blocks.append(block)
  return {"blocks": blocks,
          **{key: float(np.mean([c[key] for c in per_seed])) for key in ("all_steps_mse", "sum_of_blocks_mse")}}


def run(config, workdir, model: str = "ptq", block: int = 10, num_images: int = 64,
        seeds: tuple[int, ...] | None = None) -> dict:
  if model not in ("ptq", "finetuned"):
    raise ValueError(f"--model must be ptq or finetuned, got {model!r}.")
  if block < 1 or num_images < 1:
    raise ValueError(f"--block and --num_images must be positive, got {block} and {num_images}.")
  seeds = tuple(int(s) for s in seeds) if seeds else (int(config.seed),)
  workdir = pathlib.Path(workdir)
  models = Models(config, workdir)
  ts = diffusion.sampling_timesteps(models.schedule, models.sampler_config)
  gammas = diffusion.noise_coefficients(models.schedule, models.sampler_config)
  per_seed = []
  for seed in seeds:
    x_T, labels, rng = models.fixed_noise(num_images, seed)
    eps = {name: sampler_eps(models.apply_fn(name), models.bundle, labels) for name in ("fp", model)}
    per_seed.append(paired.swap_in_costs(
        lambda eps_fn, x_T=x_T, rng=rng: _images(models, eps_fn, x_T, rng),
        eps["fp"], eps[model], ts, gammas, block))
  costs = _over_seeds(per_seed)
  costs.update(model=model, block=block, num_images=num_images, sampler=config.sampler.kind,
               steps=int(config.sampler.num_steps), seeds=list(seeds))
  out = workdir / "diagnostics"
  checkpoint.save_json(out / f"swap_in_{model}.json", costs)
  paired.plot_swap_in(costs, out / f"swap_in_{model}.png",
                      title=f"{model}: one block of {block} steps swapped in at a time ({num_images} samples, "
                      f"seeds {list(seeds)})")
  for b in costs["blocks"]:
    shares = ", ".join(f"{w} {b['weight_share'][w]:.0%}" for w in paired.WEIGHTINGS)
    print(f"t {b['t_max']:4d}-{b['t_min']:4d}: cost {b['cost_share']:.1%} +- {b['cost_share_std']:.1%} "
          f"(sample MSE {b['sample_mse']:.3g}); loss weight {shares}")
  print(f"all steps swapped: sample MSE {costs['all_steps_mse']:.3g}; sum over blocks "
        f"{costs['sum_of_blocks_mse']:.3g} (means over seeds {list(seeds)})")
  return costs


def main(argv):
  del argv
  FLAGS = flags.FLAGS
  try:
    run(FLAGS.config, FLAGS.workdir, FLAGS.model, FLAGS.block, FLAGS.num_images,
        tuple(int(s) for s in FLAGS.seeds) if FLAGS.seeds else None)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":  # the flags are defined only when this is the program (see tests/test_imports.py)
  config_flags.DEFINE_config_file("config", None, "The run's config file (as given to msfp_jax.main).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The run's workdir (its calibration / fine-tuned checkpoint).")
  flags.DEFINE_enum("model", "ptq", ["ptq", "finetuned"], "The quantized model to swap in.")
  flags.DEFINE_integer("block", 10, "Consecutive sampler steps per block.")
  flags.DEFINE_integer("num_images", 64, "Samples from fixed noise.")
  flags.DEFINE_list("seeds", [], "Noise seeds (default: config.seed alone); the costs are mean +- std over them.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
