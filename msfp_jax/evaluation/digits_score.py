"""Distribution-level scores of digits16 samples against the held-out split.

  python -m msfp_jax.evaluation.digits_score --model=DIR [--num_samples=300] [--fid_network=default_1.pt]

Each score is reported for the model's samples and, as the yardstick, for an equally large subset of the
*training* images (real data scored the same way):
  * pixel_fd: Frechet distance between Gaussian fits of the flattened 16x16 pixels (256-d), vs held-out.
  * nn_l2_to_train: mean L2 distance from each image to its nearest training image (memorisation check:
    much lower than the yardstick would mean copying).
  * classifier_confidence / classifier_class_perplexity: a logistic-regression digit classifier trained on
    the training split (its held-out accuracy is reported) applied to the images: mean top-class
    probability, and exp(entropy) of the predicted-label histogram (10 = all classes equally often).
  * fid (optional, --fid_network): FID with the real FID Inception network (pytorch-fid pipeline, grey
    replicated to RGB) vs held-out; with a few hundred images FID is biased upwards, so compare it with
    the yardstick's value only.
Needs scikit-learn (a test requirement) for the classifier.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np

from msfp_jax.data import digits
from msfp_jax.diffusion import SamplerConfig, make_schedule, sample
from msfp_jax.evaluation.features import statistics_of_uint8_batches
from msfp_jax.evaluation.inception_weights import load_inception
from msfp_jax.evaluation.stats import fid_from_stats, frechet_distance
from msfp_jax.models import load


def pixel_frechet_distance(images: np.ndarray, reference: np.ndarray) -> float:
  a = np.asarray(images, np.float64).reshape(len(images), -1)
  b = np.asarray(reference, np.float64).reshape(len(reference), -1)
  return float(frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)))


def nearest_neighbour_l2(images: np.ndarray, reference: np.ndarray) -> float:
  a = np.asarray(images, np.float64).reshape(len(images), -1)
  b = np.asarray(reference, np.float64).reshape(len(reference), -1)
  d2 = (a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2 * a @ b.T
  return float(np.sqrt(np.maximum(d2.min(axis=1), 0)).mean())


class _FID:
  """FID against one reference set, whose Inception statistics are computed once."""

  def __init__(self, reference, fid_network):
    self._inception = load_inception(fid_network)
    self._reference = self._stats(reference)

  def _stats(self, images):
    x = np.clip((np.asarray(images) + 1) * 127.5, 0, 255).round().astype(np.uint8)
    return statistics_of_uint8_batches([np.repeat(x, 3, axis=-1)], self._inception, "pytorch-fid",
                                       batch_size=50)

  def __call__(self, images) -> float:
    return float(fid_from_stats(self._stats(images), self._reference))


def score(samples, train_x, train_y, test_x, test_y, *, fid_network=None, seed: int = 0) -> dict:
  """Scores for the samples and for a same-size subset of the training images (the yardstick)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top  (seconds to import)
  flat = lambda x: np.asarray(x, np.float64).reshape(len(x), -1)
  classifier = LogisticRegression(max_iter=2000, C=1.0).fit(flat(train_x), train_y)
  yardstick = np.asarray(train_x)[np.random.default_rng(seed).permutation(len(train_x))[: len(samples)]]
  result = {"num_images": len(samples), "num_held_out": len(test_x),
            "classifier_held_out_accuracy": float(classifier.score(flat(test_x), test_y))}
  fid = _FID(test_x, fid_network) if fid_network else None
  for name, images in (("samples", samples), ("train_subset", yardstick)):
    probs = classifier.predict_proba(flat(images))
    counts = np.bincount(probs.argmax(1), minlength=10) / len(images)
    nz = counts[counts > 0]
    entry = {"pixel_fd": pixel_frechet_distance(images, test_x),
             "nn_l2_to_train": nearest_neighbour_l2(images, train_x if name == "samples" else
                                                    _without(train_x, images)),
             "classifier_confidence": float(probs.max(1).mean()),
             "classifier_class_perplexity": float(np.exp(-(nz * np.log(nz)).sum()))}
    if fid is not None:
      entry["fid_vs_held_out"] = fid(images)
    result[name] = entry
  return result


def _without(train_x, subset):
  """The training images minus `subset` (so the yardstick's nearest neighbour is not itself)."""
  a = np.asarray(train_x).reshape(len(train_x), -1)
  b = np.asarray(subset).reshape(len(subset), -1)
  keep = ~(np.abs(a[:, None, :] - b[None, :, :]).max(-1) == 0).any(1)
  return np.asarray(train_x)[keep]


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="a converted model directory (train_fp's export)")
  parser.add_argument("--num_samples", type=int, default=300)
  parser.add_argument("--batch_size", type=int, default=100)
  parser.add_argument("--num_steps", type=int, default=100, help="DDIM steps (eta 0, uniform skip)")
  parser.add_argument("--seed", type=int, default=1)
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--fid_network", default=None, help="the FID TorchScript (default_1.pt) for real FID")
  parser.add_argument("--save_samples", default=None, help="write the samples to this .npy")
  args = parser.parse_args(argv)
  model, variables, meta = load(args.model)
  schedule = make_schedule(**meta["schedule"])
  sampler = SamplerConfig(kind="ddim", num_steps=args.num_steps, eta=0.0, skip="uniform")
  eps_fn = lambda x, t: model.apply(variables, x, t)
  res = meta["config"]["resolution"]
  chunks = []
  for i in range(0, args.num_samples, args.batch_size):
    key = jax.random.fold_in(jax.random.key(args.seed), i)
    x_T = jax.random.normal(key, (args.batch_size, res, res, meta["config"]["in_channels"]))
    chunks.append(np.asarray(sample(eps_fn, x_T, schedule, sampler)))
  samples = np.concatenate(chunks)[: args.num_samples]
  if args.save_samples:
    np.save(args.save_samples, samples)
  train_x, train_y = digits.load_split("train", args.data_dir)
  test_x, test_y = digits.load_split("test", args.data_dir)
  result = score(samples, train_x, train_y, test_x, test_y, fid_network=args.fid_network)
  result["protocol"] = {"sampler": "DDIM", "num_steps": args.num_steps, "eta": 0.0, "skip": "uniform",
                        "seed": args.seed, "reference": "digits16 test split (300 held-out images)"}
  print(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
