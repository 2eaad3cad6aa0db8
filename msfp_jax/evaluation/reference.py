"""Reference statistics from wherever users keep them.

Sources (`load_or_compute_statistics(source, ...)`):
  * a folder of images (png, jpg, jpeg, bmp, webp; grey images are replicated to RGB);
  * an .npz of statistics: pytorch-fid's (mu, sigma) or ADM's reference batches (mu, sigma, mu_s, sigma_s);
  * an .npz of images: ADM's `arr_0` (uint8 NHWC);
  * a tensorflow-datasets dataset, "tfds:NAME[:SPLIT]" (read with tfds.data_source, so an array_record
    dataset prepared in `data_dir`; nothing is downloaded).
Statistics files are used as they are (they were computed with some pipeline: the caller states which).
"""
from __future__ import annotations

import json
import os
import pathlib
import zipfile
import zlib
from collections.abc import Iterator

import numpy as np
from PIL import Image

from msfp_jax.evaluation.features import statistics_of_uint8_batches
from msfp_jax.evaluation.inception_weights import FIDInception
from msfp_jax.evaluation.stats import FeatureStatistics, symmetric_from_triu

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
BUILTIN_PREFIX = "builtin:"
# Reference statistics shipped in the package (FeatureStatistics.save_compact files with their protocol).
BUILTIN_STATISTICS = {
    "cifar10-train": "cifar10_train_tf.npz",
    "cifar10-test": "cifar10_test_tf.npz",
}


def builtin_statistics_path(name: str) -> pathlib.Path:
  """The shipped statistics file of `builtin:NAME`; one clear error for an unknown or unshipped name."""
  if name not in BUILTIN_STATISTICS:
    raise ReferenceStatisticsError(f"Unknown built-in statistics {BUILTIN_PREFIX}{name}; known: "
                                   f"{[BUILTIN_PREFIX + n for n in BUILTIN_STATISTICS]}.")
  path = pathlib.Path(__file__).resolve().parents[1] / "assets" / "reference_statistics" / BUILTIN_STATISTICS[name]
  if not path.is_file():
    shipped = [BUILTIN_PREFIX + n for n, f in BUILTIN_STATISTICS.items() if (path.parent / f).is_file()]
    raise ReferenceStatisticsError(f"{BUILTIN_PREFIX}{name} is not shipped in this version ({path} is missing); "
                                   f"shipped: {shipped or 'none'}.")
  return path


def check_statistics_protocol(stats: FeatureStatistics, *, pipeline: str, inception: FIDInception | None,
                              what: str) -> None:
  """Refuses statistics recorded with another input pipeline or other Inception weights than this score's."""
  recorded = stats.protocol or {}
  problems = []
  if recorded.get("pipeline") not in (None, pipeline):
    problems.append(f"they were computed with the {recorded['pipeline']!r} pipeline, this score uses {pipeline!r}")
  if inception is not None and recorded.get("inception_weights_sha256") not in (None, inception.sha256):
    problems.append(f"they were computed with Inception weights sha256 {recorded['inception_weights_sha256']}, "
                    f"this score uses {inception.sha256}")
  if problems:
    raise ReferenceStatisticsError(f"Reference statistics {what} do not match: {'; '.join(problems)}. Use the matching "
                                   "pipeline and network, or statistics computed with these.")


class ReferenceStatisticsError(ValueError):
  """A reference source that cannot be read or holds neither images nor statistics."""


def _read_image(path: pathlib.Path) -> np.ndarray:
  try:
    with Image.open(path) as image:
      if image.mode in ("P", "CMYK", "YCbCr", "I;16", "I", "F", "1"):
        image = image.convert("RGB")
      array = np.asarray(image)
  except Exception as e:
    raise ReferenceStatisticsError(f"Cannot read image {path}: {e}") from e
  if array.ndim == 2:
    array = array[..., None]
  if array.dtype != np.uint8:
    raise ReferenceStatisticsError(f"Image {path} is {array.dtype}, expected 8-bit.")
  return array


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
  files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
  if not files:
    raise ReferenceStatisticsError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in folder {folder}.")
  return files


def _folder_batches(folder: pathlib.Path, batch_size: int) -> Iterator[np.ndarray]:
  batch: list[np.ndarray] = []
  for path in _image_files(folder):
    image = _read_image(path)
    if batch and batch[0].shape != image.shape:
      yield np.stack(batch)
      batch = []
    batch.append(image)
    if len(batch) == batch_size:
      yield np.stack(batch)
      batch = []
  if batch:
    yield np.stack(batch)


def _magic(path: pathlib.Path) -> bytes:
  with open(path, "rb") as f:
    return f.read(8)


def _load_npz(path: pathlib.Path):
  expected = ("Expected pytorch-fid statistics (mu, sigma), ADM reference batches (arr_0 and/or mu, sigma, mu_s, "
              "sigma_s), or a folder of images.")
  try:
    data = np.load(path, allow_pickle=False)
  except ValueError as e:
    if "pickle" not in str(e):
      raise ReferenceStatisticsError(f"Cannot read {path} as an .npz file ({type(e).__name__}: {e}). {expected}") from e
    # numpy takes what is neither a zip archive nor an .npy array for a pickle: its allow_pickle hint misleads.
    raise ReferenceStatisticsError(f"Cannot read {path} as an .npz file: it is not a statistics .npz (a zip archive "
                                   f"of numpy arrays; it starts with {_magic(path)!r}). {expected}") from None
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise ReferenceStatisticsError(f"Cannot read {path} as an .npz file ({type(e).__name__}: {e}). {expected}") from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ReferenceStatisticsError(f"{path} is a single array (.npy), not an .npz archive. {expected}")
  return data


def statistics_from_npz(path: str | os.PathLike) -> FeatureStatistics | None:
  """The statistics stored in an .npz (pytorch-fid or ADM layout), or None if it holds none."""
  path = pathlib.Path(path)
  with _load_npz(path) as data:
    keys = set(data.files)
    try:
      if {"mu", "sigma_triu"} <= keys:  # the compact form of FeatureStatistics.save_compact
        mu = np.asarray(data["mu"], np.float64)
        sigma = symmetric_from_triu(data["sigma_triu"], mu.shape[0])
        mu_s = np.asarray(data["mu_s"], np.float64) if "mu_s" in keys else None
        sigma_s = symmetric_from_triu(data["sigma_s_triu"], mu_s.shape[0]) if mu_s is not None else None
      elif {"mu", "sigma"} <= keys:
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        mu_s = np.asarray(data["mu_s"], np.float64) if "mu_s" in keys else None
        sigma_s = np.asarray(data["sigma_s"], np.float64) if "sigma_s" in keys else None
      else:
        return None
      count = int(data["count"]) if "count" in keys else None
      protocol = json.loads(str(data["protocol_json"])) if "protocol_json" in keys else None
    except (ValueError, KeyError, zlib.error, zipfile.BadZipFile) as e:
      raise ReferenceStatisticsError(f"{path}: the statistics cannot be read ({type(e).__name__}: {e}).") from e
  if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
    raise ReferenceStatisticsError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its covariance.")
  return FeatureStatistics(mu, sigma, None if count == -1 else count, mu_s, sigma_s, protocol=protocol)


def _npz_image_batches(path: pathlib.Path, batch_size: int) -> Iterator[np.ndarray]:
  # Validated before returning the generator, so a wrong file is reported before any network work.
  with _load_npz(path) as data:
    if "arr_0" not in data.files:
      raise ReferenceStatisticsError(f"{path} holds neither statistics (mu, sigma) nor images (arr_0); "
                                     f"keys: {data.files}.")
    images = data["arr_0"]
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ReferenceStatisticsError(f"{path}: arr_0 must be uint8 NHWC images (ADM's layout); got {images.dtype} "
                                   f"{images.shape}.")
  return (images[start:start + batch_size] for start in range(0, len(images), batch_size))


def _tfds_batches(spec: str, batch_size: int, data_dir: str | None, image_key: str,
                  max_examples: int | None) -> Iterator[np.ndarray]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (seconds to import; tfds: sources only)

  parts = spec[len("tfds:"):].split(":")
  name, split = parts[0], parts[1] if len(parts) > 1 else "train"
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:
    raise ReferenceStatisticsError(f"Cannot open tfds dataset {name!r} split {split!r} in "
                                   f"{data_dir or 'the default data_dir'} "
                                   f"({type(e).__name__}: {e}). Prepare it there first (array_record format); "
                                   "nothing is downloaded at evaluation time.") from e
  total = len(source) if max_examples is None else min(len(source), max_examples)
  for start in range(0, total, batch_size):
    records = [source[i] for i in range(start, min(start + batch_size, total))]
    try:
      images = np.stack([np.asarray(r[image_key]) for r in records])
    except KeyError as e:
      raise ReferenceStatisticsError(f"tfds dataset {name!r} has no feature {image_key!r}; its keys: "
                                     f"{sorted(records[0])}.") from e
    yield images


def load_or_compute_statistics(source: str | os.PathLike, *, inception: FIDInception | None, pipeline: str,
                               batch_size: int = 50, data_dir: str | None = None, image_key: str = "image",
                               max_examples: int | None = None) -> FeatureStatistics:
  """Statistics of a reference source (see the module docstring). `inception` is needed for images."""
  source_str = os.fspath(source)

  def compute(batches, what):
    if inception is None:
      raise ValueError(f"Computing statistics of {what} needs the Inception network (inception=...).")
    return statistics_of_uint8_batches(batches, inception, pipeline, batch_size=batch_size, what=what)

  if source_str.startswith("tfds:"):
    return compute(_tfds_batches(source_str, batch_size, data_dir, image_key, max_examples), source_str)
  if source_str.startswith(BUILTIN_PREFIX):
    stats = statistics_from_npz(builtin_statistics_path(source_str[len(BUILTIN_PREFIX):]))
    check_statistics_protocol(stats, pipeline=pipeline, inception=inception, what=source_str)
    return stats
  path = pathlib.Path(source_str)
  if path.is_dir():
    return compute(_folder_batches(path, batch_size), f"images in {path}")
  if not path.exists():
    raise ReferenceStatisticsError(f"Reference source {path} does not exist (expected a folder of images, an .npz of "
                                   "images or statistics, or tfds:NAME[:SPLIT]).")
  stats = statistics_from_npz(path)
  if stats is not None:
    check_statistics_protocol(stats, pipeline=pipeline, inception=inception, what=str(path))
    return stats
  return compute(_npz_image_batches(path, batch_size), f"images in {path}")
