"""digits_score's metrics against brute-force numpy / scipy computations."""
import numpy as np
import pytest
import scipy.linalg

from msfp_jax.evaluation import digits_score


def test_nearest_neighbour_l2_matches_brute_force():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal((7, 4, 4, 1)), rng.standard_normal((11, 4, 4, 1))
  expected = np.mean([min(np.linalg.norm(x - y) for y in b) for x in a])
  assert digits_score.nearest_neighbour_l2(a, b) == pytest.approx(expected, rel=1e-9)


def test_pixel_frechet_distance_matches_scipy():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((50, 3, 3, 1))
  b = rng.standard_normal((60, 3, 3, 1)) * 1.5 + 0.3
  fa, fb = a.reshape(50, -1), b.reshape(60, -1)
  s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  expected = np.sum((fa.mean(0) - fb.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * covmean)
  assert digits_score.pixel_frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
  assert digits_score.pixel_frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
