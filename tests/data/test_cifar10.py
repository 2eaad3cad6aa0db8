"""CIFAR-10 from a JPEG archive (our tfds builder) and from tfds' own cifar10; every bad archive gets one error.

The fixture `tests/fixtures/cifar10-jpeg-mini.tar.xz` has the layout of shared/data/cifar10's archive
(cifar10/{train,test}/<class>/NNNN.jpg) with 20 train and 10 test images per class, taken unchanged from it.
"""
import io
import pathlib
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from msfp_jax.data import cifar10

FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "cifar10-jpeg-mini.tar.xz"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  return data_dir, {split: cifar10.load_cifar10(split, archive=FIXTURE, data_dir=data_dir)
                    for split in cifar10.SPLITS}


def _pil_decoded(archive):
  """Every member decoded independently of the module: name -> (label, uint8 image)."""
  out = {}
  with tarfile.open(archive) as tar:
    for member in tar:
      if member.isfile():
        _, split, class_name, _ = member.name.split("/")
        image = np.asarray(Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB"))
        out[member.name] = (split, cifar10.CLASSES.index(class_name), image)
  return out


def test_splits_labels_and_pixels_match_an_independent_decode(prepared):
  _, data = prepared
  reference = _pil_decoded(FIXTURE)
  for split, per_class in (("train", 20), ("test", 10)):
    images, labels = data[split]
    assert images.shape == (10 * per_class, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
    # The same multiset of (label, image) pairs as a direct decode of the members of that split.
    ours = sorted((int(label), im.tobytes()) for label, im in zip(labels, images))
    theirs = sorted((label, im.tobytes()) for s, label, im in reference.values() if s == split)
    assert ours == theirs


def test_prepared_once_then_read_without_decoding(prepared, monkeypatch):
  data_dir, data = prepared

  def must_not_decode(*args, **kwargs):
    raise AssertionError("the archive was decoded a second time")

  monkeypatch.setattr(cifar10, "read_archive", must_not_decode)
  images, labels = cifar10.load_cifar10("test", archive=FIXTURE, data_dir=data_dir)
  np.testing.assert_array_equal(images, data["test"][0])
  np.testing.assert_array_equal(labels, data["test"][1])


def test_dataset_prepared_from_another_archive_is_refused(prepared, tmp_path):
  data_dir, _ = prepared
  other = tmp_path / "other.tar.xz"
  shutil.copy(FIXTURE, other)
  with open(other, "ab") as f:
    f.write(b"\0" * 1024)  # another sha256 (tar readers ignore trailing zero blocks)
  with pytest.raises(cifar10.Cifar10ArchiveError, match="prepared from an archive with sha256"):
    cifar10.load_cifar10("train", archive=other, data_dir=data_dir)


def test_missing_archive_says_where_and_what(tmp_path):
  missing = tmp_path / "nowhere" / "cifar10-jpeg.tar.xz"
  with pytest.raises(cifar10.Cifar10ArchiveError, match=r"expected at .*nowhere.* does not exist.*cifar10/\{train"):
    cifar10.load_cifar10("train", archive=missing, data_dir=tmp_path / "tfds")
  with pytest.raises(cifar10.Cifar10ArchiveError, match="is not a file"):
    cifar10.load_cifar10("train", archive=tmp_path, data_dir=tmp_path / "tfds")


def test_damaged_archive(tmp_path):
  damaged = tmp_path / "damaged.tar.xz"
  damaged.write_bytes(FIXTURE.read_bytes()[: FIXTURE.stat().st_size // 2])
  with pytest.raises(cifar10.Cifar10ArchiveError, match="damaged or not a tar archive"):
    cifar10.load_cifar10("train", archive=damaged, data_dir=tmp_path / "tfds")
  not_tar = tmp_path / "random.tar.xz"
  not_tar.write_bytes(np.random.RandomState(0).bytes(4096))
  with pytest.raises(cifar10.Cifar10ArchiveError, match="damaged or not a tar archive"):
    cifar10.load_cifar10("train", archive=not_tar, data_dir=tmp_path / "tfds")


def _tar_of(path, members):
  with tarfile.open(path, "w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def _jpeg(size=(32, 32)):
  buffer = io.BytesIO()
  Image.new("RGB", size, (10, 20, 30)).save(buffer, format="JPEG")
  return buffer.getvalue()


def test_archive_of_another_layout(tmp_path):
  flat = _tar_of(tmp_path / "flat.tar.gz", {f"images/{i}.jpg": _jpeg() for i in range(3)})
  with pytest.raises(cifar10.Cifar10ArchiveError, match=r"not of the expected layout: no images for .*It holds e.g. "
                                                        r"\['images/0.jpg'"):
    cifar10.load_cifar10("train", archive=flat, data_dir=tmp_path / "tfds")
  wrong_class = _tar_of(tmp_path / "class.tar.gz", {"cifar10/train/zebra/0001.jpg": _jpeg()})
  with pytest.raises(cifar10.Cifar10ArchiveError, match="'zebra', which is not one of CIFAR-10's classes"):
    cifar10.load_cifar10("train", archive=wrong_class, data_dir=tmp_path / "tfds")
  wrong_size = _tar_of(tmp_path / "size.tar.gz", {"cifar10/train/cat/0001.jpg": _jpeg((64, 64))})
  with pytest.raises(cifar10.Cifar10ArchiveError, match=r"\(64, 64, 3\), CIFAR-10 images are \(32, 32, 3\)"):
    cifar10.load_cifar10("train", archive=wrong_size, data_dir=tmp_path / "tfds")


def test_no_archive_and_no_tfds_cifar10(tmp_path):
  with pytest.raises(cifar10.Cifar10ArchiveError, match="tfds' own 'cifar10' is not prepared"):
    cifar10.load_cifar10("train", data_dir=tmp_path / "empty")
  with pytest.raises(ValueError, match="unknown CIFAR-10 split"):
    cifar10.load_cifar10("validation", archive=FIXTURE)


def test_tfds_own_cifar10_is_read_where_prepared(tmp_path):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=6):
    images, labels = cifar10.load_cifar10("test", data_dir=tmp_path)
  assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (6,) and labels.min() >= 0 and labels.max() < 10
