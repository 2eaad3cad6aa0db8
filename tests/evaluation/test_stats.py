"""Statistics and metrics against independent float64 computations (scipy sqrtm, numpy)."""
import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.special

from msfp_jax.evaluation import stats as stats_lib


def _well_conditioned_cov(rng, dim):
  a = rng.normal(size=(dim, dim))
  return a @ a.T / dim + np.eye(dim)


def _scipy_frechet(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  assert np.max(np.abs(np.imag(covmean))) < 1e-8  # well-conditioned: the reference itself is clean
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean))


@pytest.mark.parametrize("dim", [8, 64, 256])
def test_frechet_distance_matches_scipy_sqrtm(dim):
  rng = np.random.RandomState(dim)
  mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
  s1, s2 = _well_conditioned_cov(rng, dim), _well_conditioned_cov(rng, dim)
  expected = _scipy_frechet(mu1, s1, mu2, s2)
  assert stats_lib.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_distance_of_identical_stats_is_zero():
  rng = np.random.RandomState(0)
  mu, s = rng.normal(size=32), _well_conditioned_cov(rng, 32)
  assert abs(stats_lib.frechet_distance(mu, s, mu, s)) < 1e-9


def test_accumulated_moments_equal_numpy_mean_and_cov():
  rng = np.random.RandomState(1)
  features = rng.normal(size=(300, 16)).astype(np.float32) * 3 + 5
  acc = stats_lib.MomentAccumulator(16)
  for chunk in np.array_split(features, 7):
    acc.update(chunk)
  # Merging two halves gives the same as one pass.
  a, b = stats_lib.MomentAccumulator(16), stats_lib.MomentAccumulator(16)
  a.update(features[:100])
  b.update(features[100:])
  a.merge(b)
  for accumulator in (acc, a):
    mean, cov = accumulator.mean_cov()
    np.testing.assert_allclose(mean, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(features.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


def test_warns_when_fewer_samples_than_dims():
  acc = stats_lib.MomentAccumulator(16)
  acc.update(np.random.RandomState(2).normal(size=(10, 16)))
  with pytest.warns(stats_lib.FewSamplesWarning, match="10 samples for 16-dimensional"):
    acc.mean_cov()
  acc.update(np.random.RandomState(3).normal(size=(10, 16)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    acc.mean_cov()


def test_fewer_than_two_samples_and_nan_features_rejected():
  acc = stats_lib.MomentAccumulator(4)
  acc.update(np.ones((1, 4)))
  with pytest.raises(ValueError, match="at least 2 samples"):
    acc.mean_cov()
  with pytest.raises(ValueError, match="NaN"):
    acc.update(np.full((2, 4), np.nan))


def test_inception_score_matches_numpy_reference():
  rng = np.random.RandomState(4)
  logits = rng.normal(size=(105, 1008)) * 3  # 105: splits of unequal sizes (10 or 11)
  scores = []
  n = len(logits)
  for part in (logits[k * n // 10:(k + 1) * n // 10] for k in range(10)):  # the original TF code's splits
    p = scipy.special.softmax(part, axis=1)
    marginal = p.mean(axis=0)
    scores.append(np.exp(np.mean(np.sum(scipy.special.rel_entr(p, marginal[None]), axis=1))))
  mean, std = stats_lib.inception_score(logits, splits=10)
  assert mean == pytest.approx(np.mean(scores), rel=1e-10)
  assert std == pytest.approx(np.std(scores), rel=1e-8)


def test_statistics_save_roundtrip_in_adm_and_pytorch_fid_layout(tmp_path):
  rng = np.random.RandomState(5)
  st = stats_lib.FeatureStatistics(rng.normal(size=3), np.eye(3), 10, rng.normal(size=2), np.eye(2))
  st.save(tmp_path / "s.npz")
  with np.load(tmp_path / "s.npz") as data:
    assert {"mu", "sigma", "mu_s", "sigma_s"} <= set(data.files)
    np.testing.assert_array_equal(data["mu"], st.mu)
  with pytest.raises(ValueError, match="sFID needs spatial statistics"):
    stats_lib.sfid_from_stats(st, stats_lib.FeatureStatistics(st.mu, st.sigma))


def test_pooled_statistics_of_two_parts_equal_those_of_the_whole():
  rng = np.random.default_rng(5)
  pool3 = rng.normal(size=(300, 6)) * [1, 2, 3, 1, 1, 0.5] + 2.0
  spatial = rng.normal(size=(300, 4)) - 1.0

  def of(rows):
    return stats_lib.FeatureStatistics(pool3[rows].mean(0), np.cov(pool3[rows], rowvar=False), len(pool3[rows]),
                                       spatial[rows].mean(0), np.cov(spatial[rows], rowvar=False))
  whole = of(slice(None))
  merged = stats_lib.pooled_statistics(of(slice(0, 113)), of(slice(113, None)), protocol={"merged": True})
  assert merged.count == 300 and merged.protocol == {"merged": True}
  for got, want in ((merged.mu, whole.mu), (merged.sigma, whole.sigma), (merged.mu_s, whole.mu_s),
                    (merged.sigma_s, whole.sigma_s)):
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  with pytest.raises(ValueError, match="sample count"):
    stats_lib.pooled_statistics(stats_lib.FeatureStatistics(whole.mu, whole.sigma), whole)
