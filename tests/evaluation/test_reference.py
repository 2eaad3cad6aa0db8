"""Reference statistics from every source format, checked against the real FID network run by torch.jit;
the fid CLI; bad reference input."""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from msfp_jax import fid as fid_cli
from msfp_jax.evaluation import load_inception, reference
from msfp_jax.evaluation.stats import FeatureStatistics, FewSamplesWarning, frechet_distance

N_IMAGES, SIZE = 4, 16


@pytest.fixture(scope="module")
def images():
  rng = np.random.RandomState(7)
  coarse = rng.randint(0, 256, (N_IMAGES, 4, 4, 3)).astype(np.uint8)
  return np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)  # blocky 16x16 uint8 RGB


@pytest.fixture(scope="module")
def inception(fid_torchscript_path):
  return load_inception(fid_torchscript_path)


@pytest.fixture(scope="module")
def torch_pool3(fid_torchscript_path, images):
  net = torch.jit.load(str(fid_torchscript_path), map_location="cpu").eval()
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
  with torch.no_grad():
    return net(x).double().numpy()


def _stats(source, inception, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FewSamplesWarning)  # 4 images << 2048 dims, on purpose
    return reference.load_or_compute_statistics(source, inception=inception, pipeline="pytorch-fid",
                                                batch_size=N_IMAGES, **kw)


def _write_folder(folder, images):
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f"{i:03d}.png")
  return folder


def _make_tfds_dataset(data_dir, images):
  import tensorflow_datasets as tfds

  class TinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(SIZE, SIZE, 3))}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, image in enumerate(images):
        yield i, {"image": image}

  builder = TinyImages(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder.name


def test_folder_npz_and_tfds_sources_agree_with_torch(tmp_path, images, inception, torch_pool3):
  folder_stats = _stats(_write_folder(tmp_path / "images", images), inception)
  np.savez(tmp_path / "adm_images.npz", arr_0=images)
  npz_stats = _stats(tmp_path / "adm_images.npz", inception)
  name = _make_tfds_dataset(tmp_path / "tfds", images)
  tfds_stats = _stats(f"tfds:{name}:train", inception, data_dir=str(tmp_path / "tfds"))

  # Independent reference: mean and covariance of torch.jit's pool3 features of the same images.
  expected_mu, expected_sigma = torch_pool3.mean(0), np.cov(torch_pool3, rowvar=False)
  for st in (folder_stats, npz_stats, tfds_stats):
    assert st.count == N_IMAGES and st.has_spatial and st.mu_s.shape == (2023,)
    assert np.linalg.norm(st.mu - expected_mu) / np.linalg.norm(expected_mu) < 1e-4
    assert np.linalg.norm(st.sigma - expected_sigma) / np.linalg.norm(expected_sigma) < 1e-3
  np.testing.assert_allclose(npz_stats.sigma, folder_stats.sigma, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(tfds_stats.mu, folder_stats.mu, rtol=1e-9)


def test_statistics_files_in_pytorch_fid_and_adm_layouts(tmp_path):
  rng = np.random.RandomState(0)
  mu, sigma = rng.normal(size=5), np.eye(5)
  np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)
  np.savez(tmp_path / "adm.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=mu, sigma=sigma,
           mu_s=mu[:3], sigma_s=np.eye(3))
  pf = reference.load_or_compute_statistics(tmp_path / "pytorch_fid.npz", inception=None, pipeline="tf")
  adm = reference.load_or_compute_statistics(tmp_path / "adm.npz", inception=None, pipeline="tf")
  np.testing.assert_array_equal(pf.mu, mu)
  assert not pf.has_spatial and adm.has_spatial
  np.testing.assert_array_equal(adm.sigma_s, np.eye(3))


@pytest.mark.parametrize("content, match", [
    (b"not an npz at all", "Cannot read .* as an .npz file"),
    (None, "single array"),
])
def test_unreadable_reference_file(tmp_path, content, match):
  path = tmp_path / "ref.npz"
  if content is None:
    with open(path, "wb") as f:
      np.save(f, np.zeros(3))
  else:
    path.write_bytes(content)
  with pytest.raises(reference.ReferenceStatisticsError, match=match):
    reference.load_or_compute_statistics(path, inception=None, pipeline="tf")


def test_missing_and_empty_reference_sources(tmp_path):
  with pytest.raises(reference.ReferenceStatisticsError, match="does not exist"):
    reference.load_or_compute_statistics(tmp_path / "absent.npz", inception=None, pipeline="tf")
  np.savez(tmp_path / "other.npz", weights=np.zeros(3))
  with pytest.raises(reference.ReferenceStatisticsError, match="neither statistics .* nor images"):
    reference.load_or_compute_statistics(tmp_path / "other.npz", inception=object(), pipeline="tf")


def test_rgba_images_rejected(tmp_path, inception):
  folder = tmp_path / "rgba"
  folder.mkdir()
  for i in range(2):
    Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(folder / f"{i}.png")
  with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\) channels; got 4"):
    _stats(folder, inception)


def test_cli_save_stats_then_fid(tmp_path, images, fid_torchscript_path, capsys):
  folder = _write_folder(tmp_path / "images", images)
  out = tmp_path / "stats.npz"
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FewSamplesWarning)
    fid_cli.main(["--inception", str(fid_torchscript_path), str(folder), "--save-stats", str(out),
                  "--batch-size", "4"])
  saved = reference.statistics_from_npz(out)
  other = FeatureStatistics(saved.mu + 0.1, saved.sigma + np.eye(2048) * 0.01)
  other.save(tmp_path / "other.npz")
  capsys.readouterr()
  result = fid_cli.main(["--inception", str(fid_torchscript_path), str(out), str(tmp_path / "other.npz")])
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  expected = frechet_distance(saved.mu, saved.sigma, other.mu, other.sigma)
  assert result["fid"] == pytest.approx(expected) and printed["fid"] == pytest.approx(expected)
  assert printed["pipeline"] == "pytorch-fid" and len(printed["inception_weights_sha256"]) == 64


def _random_stats(dim=6, dim_s=5, protocol=None):
  rng = np.random.RandomState(3)
  a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim_s, dim_s))
  return FeatureStatistics(rng.normal(size=dim), a @ a.T, 12, rng.normal(size=dim_s), b @ b.T, protocol=protocol)


def test_compact_statistics_round_trip_with_protocol(tmp_path):
  protocol = {"dataset": "cifar10", "split": "test", "pipeline": "tf", "inception_weights_sha256": "ab" * 32}
  stats = _random_stats(protocol=protocol)
  stats.save_compact(tmp_path / "s.npz")
  with np.load(tmp_path / "s.npz") as data:  # float32, each covariance once
    assert data["sigma_triu"].dtype == np.float32 and data["sigma_triu"].shape == (6 * 7 // 2,)
    assert "sigma" not in data.files
  back = reference.statistics_from_npz(tmp_path / "s.npz")
  assert back.protocol == protocol and back.count == 12
  np.testing.assert_array_equal(back.sigma, back.sigma.T)
  for ours, theirs in ((back.mu, stats.mu), (back.sigma, stats.sigma), (back.mu_s, stats.mu_s),
                       (back.sigma_s, stats.sigma_s)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="records the protocol"):
    _random_stats().save_compact(tmp_path / "t.npz")


def test_statistics_of_another_pipeline_or_network_refused(tmp_path, monkeypatch):
  stats = _random_stats(protocol={"pipeline": "tf", "inception_weights_sha256": "ab" * 32})
  stats.save_compact(tmp_path / "s.npz")

  class Net:
    sha256 = "cd" * 32

  with pytest.raises(reference.ReferenceStatisticsError, match=r"'tf' pipeline, this score uses 'pytorch-fid'"):
    reference.load_or_compute_statistics(tmp_path / "s.npz", inception=None, pipeline="pytorch-fid")
  with pytest.raises(reference.ReferenceStatisticsError, match=f"sha256 {'ab' * 32}, this score uses {'cd' * 32}"):
    reference.load_or_compute_statistics(tmp_path / "s.npz", inception=Net(), pipeline="tf")
  assert reference.load_or_compute_statistics(tmp_path / "s.npz", inception=None, pipeline="tf").count == 12
  # The same check for a built-in name.
  monkeypatch.setattr(reference, "builtin_statistics_path", lambda name: tmp_path / "s.npz")
  with pytest.raises(reference.ReferenceStatisticsError, match="builtin:cifar10-test do not match"):
    reference.load_or_compute_statistics("builtin:cifar10-test", inception=Net(), pipeline="tf")


def test_unknown_builtin_statistics():
  with pytest.raises(reference.ReferenceStatisticsError, match=r"Unknown built-in statistics builtin:imagenet; known: "
                                                     r"\['builtin:cifar10-train', 'builtin:cifar10-test'\]"):
    reference.load_or_compute_statistics("builtin:imagenet", inception=None, pipeline="tf")


def test_save_stats_to_a_missing_folder_fails_before_any_work(tmp_path, monkeypatch):
  def must_not_load(*args, **kwargs):
    raise AssertionError("the network was loaded before the output path was checked")

  monkeypatch.setattr("msfp_jax.evaluation.load_inception", must_not_load)
  with pytest.raises(SystemExit, match="the folder .*no_such_dir does not exist"):
    fid_cli.main(["--inception", "x.pt", "some_source", "--save-stats", str(tmp_path / "no_such_dir" / "x.npz")])


def test_random_bytes_are_not_a_statistics_npz(tmp_path):
  # numpy takes a file that is neither a zip archive nor an .npy array for a pickle, and its hint ("allow_pickle")
  # points the wrong way: the message says what the file is not and which keys statistics need.
  path = tmp_path / "ref.npz"
  path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  with pytest.raises(reference.ReferenceStatisticsError) as error:
    reference.load_or_compute_statistics(path, inception=None, pipeline="tf")
  message = str(error.value)
  assert "allow_pickle" not in message and "pickle" not in message, message
  assert "not a statistics .npz" in message and "(mu, sigma)" in message and str(path) in message
  assert "\n" not in message
