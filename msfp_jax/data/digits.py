"""The built-in default model's data: sklearn's 8x8 digits, upscaled to 16x16, as a tfds dataset.

A `GeneratorBasedBuilder` of our own writing `array_record` files, read back through
`tfds.data_source` (random access, no TensorFlow needed; `tfds.load` / `as_dataset` would need it).
Nothing is downloaded: the images ship with scikit-learn.
"""
from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 16
NUM_HELD_OUT = 300  # of 1797: 1497 train, 300 held out (for FID / distribution scores)
SPLIT_SEED = 0


def upscaled_digits() -> tuple[np.ndarray, np.ndarray]:
  """All 1797 digits as float32 [N, 16, 16, 1] in [-1, 1] (bilinear, half-pixel centres) + labels."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top  (scikit-learn: seconds to import)
  digits = load_digits()
  images = digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # pixel values are 0..16
  up = jax.image.resize(images[..., None], (images.shape[0], IMAGE_SIZE, IMAGE_SIZE, 1), method="linear",
                        antialias=False)
  return np.clip(np.asarray(up, np.float32), -1.0, 1.0), digits.target.astype(np.int64)


def split_indices() -> dict[str, np.ndarray]:
  """A fixed permutation of the 1797 digits: the first 300 are held out ("test"), the rest "train"."""
  order = np.random.default_rng(SPLIT_SEED).permutation(1797)
  return {"train": np.sort(order[NUM_HELD_OUT:]), "test": np.sort(order[:NUM_HELD_OUT])}


class Digits16(tfds.core.GeneratorBasedBuilder):
  """sklearn digits at 16x16x1 in [-1, 1], splits "train" (1497) and "test" (300, held out)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "sklearn load_digits, bilinear 8->16, seed-0 split of 1497/300.",
                   "1.1.0": "Adds 'index', the position in load_digits (same images and split)."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=10),
            "index": tfds.features.Scalar(dtype=np.int64),  # position in sklearn's load_digits
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    images, labels = upscaled_digits()
    return {name: self._generate_examples(images, labels, idx) for name, idx in split_indices().items()}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": images[i], "label": int(labels[i]), "index": int(i)}


def default_data_dir() -> pathlib.Path:
  """Where the prepared dataset lives unless told otherwise: $MSFP_DATA_DIR or ~/.cache/msfp_jax/tfds."""
  return pathlib.Path(os.environ.get("MSFP_DATA_DIR", pathlib.Path.home() / ".cache" / "msfp_jax" / "tfds"))


def digits16_source(split: str, data_dir: str | os.PathLike | None = None):
  """A random-access data source (len, __getitem__ -> {"image", "label", "index"}) of one split.

  The dataset is prepared (array_record files under data_dir) on first use.
  """
  if split not in ("train", "test"):
    raise ValueError(f"unknown split {split!r} of digits16; use 'train' or 'test'.")
  builder = Digits16(data_dir=str(data_dir or default_data_dir()), file_format="array_record")
  builder.download_and_prepare()
  return builder.as_data_source(split=split)


def load_split(split: str, data_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The whole split as arrays (it is tiny): images float32 [N, 16, 16, 1], labels int [N]."""
  source = digits16_source(split, data_dir)
  records = [source[i] for i in range(len(source))]
  return (np.stack([r["image"] for r in records]).astype(np.float32),
          np.asarray([r["label"] for r in records], np.int64))
