"""The shipped CIFAR-10 statistics (msfp_jax/assets/reference_statistics) against the real FID network in PyTorch.

The fixture archive's 100 test and 200 training images are real CIFAR-10 images (taken unchanged from the JPEG
archive the statistics were computed from). Their pool3 features, computed here by torch.jit with the TF pipeline
written out in numpy (independent of msfp_jax.evaluation), are a sample of the distribution the shipped mean and
covariance describe: each feature's sample mean must lie within its standard error of the shipped mean.
"""
import dataclasses
import io
import json
import pathlib
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from msfp_jax.evaluation import reference
from msfp_jax.evaluation.inception_weights import file_sha256
from msfp_jax.evaluation.stats import fid_from_stats

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-jpeg-mini.tar.xz"
ARCHIVE_SHA256 = "a3ef6a880db97cf6045e416e786c1e5e3186105885c6649bc5c25f5ead8b37ca"  # ../shared/data/cifar10/README.md


SHIPPED = {"test": 10_000, "train": 50_000}  # split -> N: each split's statistics cover all of its images


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def split(request):
  return request.param


@pytest.fixture(scope="module")
def shipped(split):
  return reference.statistics_from_npz(reference.builtin_statistics_path(f"cifar10-{split}"))


def _fixture_images(split: str) -> np.ndarray:
  with tarfile.open(FIXTURE, "r:xz") as archive:
    members = sorted((m for m in archive.getmembers() if m.isfile() and f"/{split}/" in m.name),
                     key=lambda m: m.name)
    return np.stack([np.asarray(Image.open(io.BytesIO(archive.extractfile(m).read())).convert("RGB"))
                     for m in members])


def _tf1_resize_299(images: np.ndarray) -> np.ndarray:
  """TF1 bilinear resize (align_corners=False, half_pixel_centers=False) of float images, in float64."""
  def taps(n_in):
    src = np.arange(299) * (n_in / 299)
    lo = np.floor(src).astype(int)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo
  x = images.astype(np.float64)
  lo, hi, frac = taps(x.shape[1])
  x = x[:, lo] * (1 - frac)[None, :, None, None] + x[:, hi] * frac[None, :, None, None]
  lo, hi, frac = taps(x.shape[2])
  return x[:, :, lo] * (1 - frac)[None, None, :, None] + x[:, :, hi] * frac[None, None, :, None]


def _torch_pool3(fid_torchscript_path, images: np.ndarray) -> np.ndarray:
  net = torch.jit.load(str(fid_torchscript_path), map_location="cpu").eval()
  x = (_tf1_resize_299(images) - 128.0) / 128.0  # the TF graph's own preprocessing
  with torch.no_grad():
    return np.concatenate([net(torch.from_numpy(x[i:i + 25]).permute(0, 3, 1, 2).float()).double().numpy()
                           for i in range(0, len(x), 25)])


def test_shipped_statistics_record_their_protocol(split, shipped, fid_torchscript_path):
  assert shipped.count == SHIPPED[split] and shipped.mu.shape == (2048,) and shipped.sigma.shape == (2048, 2048)
  p = shipped.protocol
  assert (p["dataset"], p["split"], p["num_samples"], p["pipeline"]) == ("cifar10", split, SHIPPED[split], "tf")
  assert "partial" not in p
  assert p["source_sha256"] == ARCHIVE_SHA256
  assert p["inception_weights_sha256"] == file_sha256(fid_torchscript_path)
  np.testing.assert_array_equal(shipped.sigma, shipped.sigma.T)
  assert np.linalg.eigvalsh(shipped.sigma).min() > -1e-3 * np.abs(shipped.sigma).max()  # a covariance
  with np.load(reference.builtin_statistics_path(f"cifar10-{split}")) as data:  # compact: float32, triangle once
    assert data["mu"].dtype == np.float32 and "sigma" not in data.files
    assert json.loads(str(data["protocol_json"]))["split"] == split


def test_shipped_mean_agrees_with_torch_features_of_real_images_of_its_split(split, shipped, fid_torchscript_path):
  images = _fixture_images(split)
  assert images.shape == ({"test": 100, "train": 200}[split], 32, 32, 3)
  features = _torch_pool3(fid_torchscript_path, images)

  def mean_squared_z(feats):
    # Per feature: (sample mean - shipped mean) / standard error, from the shipped variances.
    stderr = np.sqrt(np.diag(shipped.sigma).astype(np.float64) / len(feats))
    return float(np.mean(((feats.mean(0) - shipped.mu) / np.maximum(stderr, 1e-12)) ** 2))

  # A sample of the same distribution: about 1 (features are correlated, so allow a wide band).
  assert 0.3 < mean_squared_z(features) < 3.0
  # The same images at 8x8 resolution (4x4 blocks) are detected: the check can fail. (20 % darker images are
  # not: pool3 is nearly invariant to brightness.)
  n = len(images)
  blocky = images.reshape(n, 8, 4, 8, 4, 3).mean((2, 4), keepdims=True)
  blocky = np.broadcast_to(blocky, (n, 8, 4, 8, 4, 3)).reshape(n, 32, 32, 3)
  assert mean_squared_z(_torch_pool3(fid_torchscript_path, np.round(blocky).astype(np.uint8))) > 3.0


def test_shipped_train_and_test_statistics_are_of_one_distribution():
  # Computed separately (different images, different sessions); CIFAR-10's train-vs-test FID is about 3 on the
  # original PNGs. The control (the test statistics against a mean shifted by one standard deviation per feature)
  # shows the distance is not blind.
  train, test = (reference.statistics_from_npz(reference.builtin_statistics_path(f"cifar10-{s}"))
                 for s in ("train", "test"))
  assert 1.5 < fid_from_stats(train, test) < 6.0
  shifted = dataclasses.replace(test, mu=test.mu + np.sqrt(np.diag(test.sigma)))
  assert fid_from_stats(train, shifted) > 100
