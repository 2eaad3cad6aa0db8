"""The Digits16 tfds builder on its real data, against sklearn + torch's bilinear interpolation."""
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from msfp_jax.data import digits


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  return {split: digits.digits16_source(split, data_dir) for split in ("train", "test")}, data_dir


def test_splits_are_a_disjoint_partition_of_sklearn_digits(splits):
  sources, _ = splits
  assert len(sources["train"]) == 1497 and len(sources["test"]) == 300
  indices = {s: sorted(int(src[i]["index"]) for i in range(len(src))) for s, src in sources.items()}
  assert not set(indices["train"]) & set(indices["test"])
  assert sorted(indices["train"] + indices["test"]) == list(range(1797))


def test_images_are_bilinear_upscales_of_sklearn_digits(splits):
  sources, _ = splits
  reference = load_digits()
  # Independent reference: torch bilinear, half-pixel centres (align_corners=False), of [0, 16] -> [-1, 1].
  low = torch.from_numpy(reference.images.astype(np.float32) / 8.0 - 1.0)[:, None]
  up = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
  up = up[:, 0, :, :, None].numpy()
  for split in ("train", "test"):
    for i in range(0, len(sources[split]), 37):
      record = sources[split][i]
      k = int(record["index"])
      assert record["image"].shape == (16, 16, 1) and record["image"].dtype == np.float32
      np.testing.assert_allclose(record["image"], up[k], atol=1e-6)
      assert int(record["label"]) == reference.target[k]


def test_load_split_arrays_and_bad_split(splits):
  _, data_dir = splits
  images, labels = digits.load_split("test", data_dir)
  assert images.shape == (300, 16, 16, 1) and labels.shape == (300,)
  assert images.min() == -1.0 and images.max() == 1.0
  with pytest.raises(ValueError, match="split"):
    digits.digits16_source("validation", data_dir)
