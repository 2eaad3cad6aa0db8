"""Feature statistics and the metrics built on them: FID, sFID, Inception Score.

Means and covariances are accumulated in float64 on the host as sums: a float32 running covariance over
50k samples loses the small eigenvalues that the Frechet distance's trace of a matrix square root depends
on. Sums of separate batches, rounds or hosts combine by addition, which makes evaluation resumable.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterable

import numpy as np


class FewSamplesWarning(UserWarning):
  """Fewer samples than feature dimensions: the covariance is singular and FID is biased."""


@dataclasses.dataclass
class MomentAccumulator:
  """Running count, sum and sum of outer products of feature vectors, in float64.

  Add batches with `update`, merge accumulators of other rounds or hosts with `merge`, read the
  mean and (unbiased) covariance with `mean_cov`.
  """
  dim: int
  count: int = 0
  total: np.ndarray | None = None
  outer: np.ndarray | None = None

  def __post_init__(self):
    if self.total is None:
      self.total = np.zeros(self.dim, np.float64)
    if self.outer is None:
      self.outer = np.zeros((self.dim, self.dim), np.float64)

  def update(self, features) -> None:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != self.dim:
      raise ValueError(f"Expected features of shape [batch, {self.dim}], got {x.shape}.")
    if not np.all(np.isfinite(x)):
      raise ValueError("Features contain NaN or infinity; the images fed to the Inception network are not finite.")
    self.count += x.shape[0]
    self.total += x.sum(axis=0)
    self.outer += x.T @ x

  def merge(self, other: MomentAccumulator) -> None:
    if other.dim != self.dim:
      raise ValueError(f"Cannot merge statistics of dimension {other.dim} into {self.dim}.")
    self.count += other.count
    self.total += other.total
    self.outer += other.outer

  def mean_cov(self, *, what: str = "features") -> tuple[np.ndarray, np.ndarray]:
    if self.count < 2:
      raise ValueError(f"A covariance needs at least 2 samples; the {what} statistics have {self.count}.")
    if self.count < self.dim:
      warnings.warn(
          f"{self.count} samples for {self.dim}-dimensional {what}: the covariance is singular and the "
          "Frechet distance is biased upward; use at least as many samples as dimensions (50k is standard).",
          FewSamplesWarning, stacklevel=2)
    mean = self.total / self.count
    cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
    return mean, (cov + cov.T) / 2  # exact symmetry for the eigen-decompositions downstream


@dataclasses.dataclass(frozen=True)
class FeatureStatistics:
  """Mean and covariance of pool3 features, and of the sFID spatial features when available."""
  mu: np.ndarray
  sigma: np.ndarray
  count: int | None = None
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  # How they were computed (dataset, source sha256, N, pipeline, Inception weights' hash), when recorded.
  protocol: dict | None = dataclasses.field(default=None, compare=False)

  @property
  def has_spatial(self) -> bool:
    return self.mu_s is not None and self.sigma_s is not None

  def sha256(self) -> str:
    """Identifies the statistics (float64 bytes of mu, sigma and, if present, mu_s, sigma_s)."""
    digest = hashlib.sha256()
    for a in (self.mu, self.sigma, self.mu_s, self.sigma_s):
      if a is not None:
        digest.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return digest.hexdigest()

  def save(self, path) -> None:
    """Writes an .npz readable by pytorch-fid (mu, sigma) and ADM's evaluator (mu, sigma, mu_s, sigma_s)."""
    arrays = {"mu": self.mu, "sigma": self.sigma}
    if self.has_spatial:
      arrays.update(mu_s=self.mu_s, sigma_s=self.sigma_s)
    if self.count is not None:
      arrays["count"] = np.asarray(self.count)
    with open(path, "wb") as f:
      np.savez(f, **arrays)

  def save_compact(self, path) -> None:
    """Writes the shipped form: float32, each symmetric covariance once (its upper triangle), the protocol
    as JSON; deflated. `msfp_jax.evaluation.statistics_from_npz` reads it back (symmetric, as float64)."""
    if self.protocol is None:
      raise ValueError("save_compact records the protocol; these statistics have none.")
    arrays = {"mu": np.asarray(self.mu, np.float32),
              "sigma_triu": np.asarray(self.sigma[np.triu_indices(len(self.mu))], np.float32),
              "count": np.asarray(self.count if self.count is not None else -1),
              "protocol_json": np.asarray(json.dumps(self.protocol, sort_keys=True))}
    if self.has_spatial:
      arrays.update(mu_s=np.asarray(self.mu_s, np.float32),
                    sigma_s_triu=np.asarray(self.sigma_s[np.triu_indices(len(self.mu_s))], np.float32))
    with open(path, "wb") as f:
      np.savez_compressed(f, **arrays)


def _pooled(n1: int, mu1, sigma1, n2: int, mu2, sigma2) -> tuple[np.ndarray, np.ndarray]:
  n = n1 + n2
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  delta = mu1 - mu2
  sigma = ((n1 - 1) * np.asarray(sigma1, np.float64) + (n2 - 1) * np.asarray(sigma2, np.float64)
           + (n1 * n2 / n) * np.outer(delta, delta)) / (n - 1)
  return (n1 * mu1 + n2 * mu2) / n, (sigma + sigma.T) / 2


def pooled_statistics(a: FeatureStatistics, b: FeatureStatistics, protocol: dict | None = None
                      ) -> FeatureStatistics:
  """The statistics of two disjoint sets of images together, from each set's (count, mean, covariance); with
  the sample covariances of both, this equals computing them over the union in one piece (up to rounding).
  Used to finish reference statistics computed in parts (launch/finish_cifar10_train_statistics.py)."""
  if a.count is None or b.count is None or a.count < 2 or b.count < 2:
    raise ValueError(f"pooling needs the sample count of both parts (at least 2 each), got {a.count} and {b.count}.")
  if a.has_spatial != b.has_spatial:
    raise ValueError("pooling needs the sFID spatial part in both statistics or in neither.")
  mu, sigma = _pooled(a.count, a.mu, a.sigma, b.count, b.mu, b.sigma)
  mu_s = sigma_s = None
  if a.has_spatial:
    mu_s, sigma_s = _pooled(a.count, a.mu_s, a.sigma_s, b.count, b.mu_s, b.sigma_s)
  return FeatureStatistics(mu, sigma, a.count + b.count, mu_s, sigma_s, protocol=protocol)


def symmetric_from_triu(values: np.ndarray, dim: int) -> np.ndarray:
  """The symmetric [dim, dim] matrix (float64) whose upper triangle, row by row, is `values`."""
  values = np.asarray(values, np.float64)
  if values.shape != (dim * (dim + 1) // 2,):
    raise ValueError(f"an upper triangle of a {dim}x{dim} matrix has {dim * (dim + 1) // 2} values, got "
                     f"{values.shape}.")
  matrix = np.zeros((dim, dim), np.float64)
  matrix[np.triu_indices(dim)] = values
  return matrix + np.triu(matrix, 1).T


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
  eigvals, eigvecs = np.linalg.eigh(matrix)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
  """Tr(sqrt(sigma1 sigma2)) for symmetric PSD matrices, through symmetric eigen-decompositions.

  sigma1 sigma2 is similar to A = sqrt(sigma1) sigma2 sqrt(sigma1), which is symmetric PSD, so the trace is
  the sum of the square roots of A's (real, non-negative) eigenvalues: no complex arithmetic, no spurious
  imaginary parts as with scipy.linalg.sqrtm of the non-symmetric product.
  """
  root1 = _sqrt_psd(sigma1)
  a = root1 @ sigma2 @ root1
  eigvals = np.linalg.eigvalsh((a + a.T) / 2)
  return float(np.sum(np.sqrt(np.clip(eigvals, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrt(sigma1 sigma2)), in float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"Statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                     f"{sigma2.shape}.")
  for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{name} contains NaN or infinity.")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2))


def fid_from_stats(a: FeatureStatistics, b: FeatureStatistics) -> float:
  return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


def sfid_from_stats(a: FeatureStatistics, b: FeatureStatistics) -> float:
  if not (a.has_spatial and b.has_spatial):
    raise ValueError("sFID needs spatial statistics (mu_s, sigma_s) on both sides; pytorch-fid's stats files "
                     "have none: compute the reference from images or use ADM's reference batches.")
  return frechet_distance(a.mu_s, a.sigma_s, b.mu_s, b.sigma_s)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """Inception Score (mean, std over `splits` consecutive splits) from [N, 1008] logits, in float64.

  Split k holds samples [k N // splits, (k + 1) N // splits), as in the original TF code.
  """
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) < splits:
    raise ValueError(f"Inception Score needs [N >= {splits}, classes] logits; got shape {logits.shape}.")
  log_p = _log_softmax(logits)
  p = np.exp(log_p)
  n = len(p)
  scores = []
  for k in range(splits):
    part_p, part_log = p[k * n // splits:(k + 1) * n // splits], log_p[k * n // splits:(k + 1) * n // splits]
    log_marginal = np.log(part_p.mean(axis=0))
    kl = np.sum(part_p * (part_log - log_marginal), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def statistics_from_features(pool3: Iterable[np.ndarray], spatial: Iterable[np.ndarray] | None = None
                             ) -> FeatureStatistics:
  """FeatureStatistics from batches of features (convenience for in-memory features)."""
  acc = None
  for batch in pool3:
    acc = acc or MomentAccumulator(np.shape(batch)[1])
    acc.update(batch)
  if acc is None:
    raise ValueError("No features given.")
  mu, sigma = acc.mean_cov(what="pool3 features")
  mu_s = sigma_s = None
  if spatial is not None:
    acc_s = None
    for batch in spatial:
      acc_s = acc_s or MomentAccumulator(np.shape(batch)[1])
      acc_s.update(batch)
    mu_s, sigma_s = acc_s.mean_cov(what="sFID spatial features")
  return FeatureStatistics(mu, sigma, acc.count, mu_s, sigma_s)
