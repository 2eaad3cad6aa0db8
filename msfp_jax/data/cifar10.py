"""CIFAR-10 as a tensorflow-datasets dataset: tfds' own `cifar10`, or a JPEG archive of our own layout.

Two sources, one result (uint8 [N, 32, 32, 3] images and int labels in CIFAR-10's label order):

* tfds' own `cifar10`, where a user has prepared it in a `data_dir` (read with `tfds.data_source` when it is
  stored as array_record, else through `tfds.load`, which needs TensorFlow);
* `Cifar10Jpeg`, a `GeneratorBasedBuilder` of our own that reads an archive laid out as
  `cifar10/{train,test}/<class>/<name>.jpg` (the JPEG q75 copy of CIFAR-10 in `shared/data/cifar10/`, or a
  test fixture of the same layout), decodes every image with Pillow and writes array_record files into a
  tfds `data_dir`. The archive is decoded once; later reads come from the prepared files.

Nothing is downloaded. The archive's sha256 is recorded in the prepared dataset's metadata and checked on
every load, so a dataset prepared from another archive is never served under this one's name.
"""
from __future__ import annotations

import io
import lzma
import os
import pathlib
import re
import tarfile
import zlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from msfp_jax.checkpoint import file_sha256
from msfp_jax.data.digits import default_data_dir

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
IMAGE_SHAPE = (32, 32, 3)
# <root>/<split>/<class>/<name>.jpg, with root "cifar10" (the layout of shared/data/cifar10's archive).
_MEMBER = re.compile(r"^(?:\./)?cifar10/(train|test)/([a-z]+)/([^/]+\.jpe?g)$", re.IGNORECASE)
_ARCHIVE_SHA256_FILE = "archive_sha256.txt"
ARCHIVE_DESCRIPTION = ("a tar archive (.tar, .tar.gz, .tar.xz) of CIFAR-10 as JPEG files laid out as "
                       "cifar10/{train,test}/<class>/NNNN.jpg, such as shared/data/cifar10/cifar10-jpeg.tar.xz")


class Cifar10ArchiveError(ValueError):
  """The CIFAR-10 archive is missing, damaged, or not of the expected layout."""


def check_archive_path(archive: str | os.PathLike) -> pathlib.Path:
  """The archive as a resolved path; one clear error when it is not there."""
  if not archive:
    raise Cifar10ArchiveError(
        f"No CIFAR-10 archive given. Set data.archive to {ARCHIVE_DESCRIPTION}, or prepare tfds' own "
        "'cifar10' in data.data_dir and set data.source='tfds'.")
  path = pathlib.Path(archive).expanduser()
  if not path.exists():
    raise Cifar10ArchiveError(f"The CIFAR-10 archive is expected at {path.resolve()}, which does not exist. "
                              f"It is {ARCHIVE_DESCRIPTION}; set data.archive to where it is.")
  if not path.is_file():
    raise Cifar10ArchiveError(f"{path} is not a file; data.archive must be {ARCHIVE_DESCRIPTION}.")
  return path.resolve()


def read_archive(archive: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
  """Decodes the whole archive: split -> (uint8 images [N, 32, 32, 3], int64 labels [N], member names).

  Images are in the order of their names (class, then file name), so the result is the same whatever the
  order of the tar members.
  """
  path = check_archive_path(archive)
  found: dict[str, list[tuple[str, int, np.ndarray]]] = {s: [] for s in SPLITS}
  others: list[str] = []
  try:
    with tarfile.open(path, "r:*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        match = _MEMBER.match(member.name)
        if match is None:
          others.append(member.name)
          continue
        split, class_name, _ = match.groups()
        if class_name not in CLASSES:
          raise Cifar10ArchiveError(f"{path}: {member.name} is in class folder {class_name!r}, which is not one "
                                    f"of CIFAR-10's classes {list(CLASSES)}. Expected {ARCHIVE_DESCRIPTION}.")
        data = tar.extractfile(member).read()
        try:
          with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        except Exception as e:
          raise Cifar10ArchiveError(f"{path}: {member.name} is not a readable image ({e}).") from e
        if array.shape != IMAGE_SHAPE:
          raise Cifar10ArchiveError(f"{path}: {member.name} is {array.shape}, CIFAR-10 images are {IMAGE_SHAPE}.")
        found[split.lower()].append((member.name, CLASSES.index(class_name), array))
  except (tarfile.TarError, lzma.LZMAError, zlib.error, EOFError, OSError) as e:
    raise Cifar10ArchiveError(f"{path} is damaged or not a tar archive ({type(e).__name__}: {e}). It should be "
                              f"{ARCHIVE_DESCRIPTION}; copy it again.") from e
  missing = [f"{s}/{c}" for s in SPLITS for c in CLASSES
             if not any(label == CLASSES.index(c) for _, label, _ in found[s])]
  if missing:
    example = f" It holds e.g. {others[:3]}." if others else ""
    raise Cifar10ArchiveError(f"{path} is not of the expected layout: no images for {missing[:4]}"
                              f"{' ...' if len(missing) > 4 else ''}. Expected {ARCHIVE_DESCRIPTION}.{example}")
  result = {}
  for split, entries in found.items():
    entries.sort(key=lambda e: e[0])
    result[split] = (np.stack([e[2] for e in entries]), np.asarray([e[1] for e in entries], np.int64),
                     [e[0] for e in entries])
  return result


class Cifar10Jpeg(tfds.core.GeneratorBasedBuilder):
  """CIFAR-10 decoded from a JPEG archive (see the module docstring): splits "train" and "test"."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Decoded with Pillow from cifar10/{train,test}/<class>/*.jpg; uint8 HWC."}

  def __init__(self, *, archive: str | os.PathLike | None = None, **kwargs):
    self._archive = archive
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            # A Tensor, not an Image feature: reading it back needs no TensorFlow and no re-decoding.
            "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(CLASSES)),
            "id": tfds.features.Text(),  # the member name in the archive
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    decoded = read_archive(self._archive)
    return {split: self._generate_examples(*decoded[split]) for split in SPLITS}

  def _generate_examples(self, images, labels, names):
    for image, label, name in zip(images, labels, names):
      yield name, {"image": image, "label": int(label), "id": name}


def prepare_jpeg_dataset(archive: str | os.PathLike, data_dir: str | os.PathLike) -> Cifar10Jpeg:
  """The prepared builder for `archive` in `data_dir` (decoding the archive only the first time).

  A dataset prepared earlier from another archive (another sha256) is refused, naming both.
  """
  archive = check_archive_path(archive)
  sha256 = file_sha256(archive)
  builder = Cifar10Jpeg(archive=archive, data_dir=str(data_dir), file_format="array_record")
  record = pathlib.Path(builder.data_dir) / _ARCHIVE_SHA256_FILE
  if builder.is_prepared() and record.is_file():
    prepared_from = record.read_text().strip()
    if prepared_from != sha256:
      raise Cifar10ArchiveError(
          f"{builder.data_dir} holds CIFAR-10 prepared from an archive with sha256 {prepared_from}, but "
          f"{archive} has sha256 {sha256}. Use another data.data_dir, or delete that folder to re-prepare.")
    return builder
  builder.download_and_prepare()
  record.write_text(sha256 + "\n")
  return builder


def _tfds_cifar10_arrays(split: str, data_dir: str | None) -> tuple[np.ndarray, np.ndarray]:
  try:
    source = tfds.data_source("cifar10", split=split, data_dir=data_dir, download=False)
    records = [source[i] for i in range(len(source))]
    return (np.stack([np.asarray(r["image"], np.uint8) for r in records]),
            np.asarray([r["label"] for r in records], np.int64))
  except Exception:  # noqa: BLE001  (tfrecord-stored datasets have no random access: read them with TF)
    pass
  try:
    data = tfds.as_numpy(tfds.load("cifar10", split=split, data_dir=data_dir, batch_size=-1, download=False))
  except Exception as e:  # noqa: BLE001
    raise Cifar10ArchiveError(
        f"tfds' own 'cifar10' is not prepared in {data_dir or 'the default data_dir'} ({type(e).__name__}: {e}). "
        f"Prepare it there, or set data.archive to {ARCHIVE_DESCRIPTION}.") from e
  return np.asarray(data["image"], np.uint8), np.asarray(data["label"], np.int64)


def load_cifar10(split: str, *, archive: str | os.PathLike | None = None,
                 data_dir: str | os.PathLike | None = None,
                 source: str = "auto") -> tuple[np.ndarray, np.ndarray]:
  """One split as uint8 images [N, 32, 32, 3] and int64 labels [N].

  source: "jpeg" (our builder over `archive`), "tfds" (tfds' own cifar10 in `data_dir`), or "auto" (the
  archive when one is given, else tfds' own).
  """
  if split not in SPLITS:
    raise ValueError(f"unknown CIFAR-10 split {split!r}; use one of {SPLITS}.")
  if source not in ("auto", "jpeg", "tfds"):
    raise ValueError(f"unknown CIFAR-10 source {source!r}; use 'auto', 'jpeg' or 'tfds'.")
  if source == "tfds" or (source == "auto" and not archive):
    return _tfds_cifar10_arrays(split, None if data_dir is None else str(data_dir))
  if data_dir is None:
    data_dir = default_data_dir()
  builder = prepare_jpeg_dataset(archive, data_dir)
  data = builder.as_data_source(split=split)
  records = [data[i] for i in range(len(data))]
  return (np.stack([np.asarray(r["image"], np.uint8) for r in records]),
          np.asarray([r["label"] for r in records], np.int64))


def archive_protocol(archive: str | os.PathLike) -> dict:
  """What a result computed from this archive records about it."""
  path = check_archive_path(archive)
  return {"archive": path.name, "archive_sha256": file_sha256(path)}
