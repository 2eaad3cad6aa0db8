"""Resumable, sharded evaluation: sample N images in rounds, score them with FID / sFID / IS.

Each host samples `batch_size` images per round with `sample_fn(rng, batch_size)` (class-conditional models:
`sample_fn(rng, batch_size, labels)`, the round's slice of one balanced label list), computes their Inception
features on its devices (the batch split over the "data" mesh axis) as they come, and adds them to its one
running-total file `workdir/eval/<name>/accum_<host>.npz`, rewritten atomically (temporary file, fsync,
os.replace) after every round: the number of finished rounds and the samples kept in each, the count, the
float64 sum and sum of outer products of the pool3 and sFID features, and the IS logits so far.
An interruption loses at most the round in progress; a rerun continues after the last finished round (round
i's rng is derived from (seed, i, host) alone and the saved float64 totals are exact, so the result is
bit-identical to an uninterrupted run's). Host 0 then combines all hosts' files and writes `results.json`:
the scores together with the protocol (model checkpoint hash, sampler, steps, eta, guidance, seed, N,
pipeline, Inception weights hash, reference statistics hash), `statistics.npz` (usable as a reference
later) and `samples.png` (a grid of the first samples).

Disk: bounded independently of the number of rounds: per host one accumulator file of two float64
feature-moment matrices (2048^2 + 2023^2 doubles, about 66 MB) plus the IS logits (N x 1008 float32,
about 4 KB per sample), and while it is being rewritten one temporary copy of it.
"""
from __future__ import annotations

import json
import math
import pathlib
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from msfp_jax import checkpoint, parallel, plotting
from msfp_jax.evaluation import preprocess
from msfp_jax.evaluation.features import StatisticsBuilder, check_images, make_feature_fn, raise_if_not_finite
from msfp_jax.evaluation.inception_weights import FIDInception
from msfp_jax.evaluation.stats import FeatureStatistics, MomentAccumulator, frechet_distance, inception_score

REQUIRED_PROTOCOL_KEYS = ("model_checkpoint_sha256", "sampler", "steps", "eta", "guidance", "seed")
IS_SPLITS = 10


class EvalProtocolError(ValueError):
  """The evaluation request is incomplete or conflicts with rounds already in the workdir."""


def _eval_dir(workdir, name: str) -> pathlib.Path:
  if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
    raise ValueError(f"Evaluation name {name!r} must be a plain file name (letters, digits, _ . -).")
  return pathlib.Path(workdir) / "eval" / name


def _accum_path(directory: pathlib.Path, host: int) -> pathlib.Path:
  return directory / f"accum_{host}.npz"


def save_image_grid(images: np.ndarray, path: pathlib.Path) -> None:
  """Saves NHWC images in [-1, 1] (1 or 3 channels) as one PNG grid, row-major, near-square, no gaps."""
  grid = plotting.image_grid(images, gap=0)
  with checkpoint.atomic_file(path) as f:
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(f, format="PNG")


def _local_mesh(mesh):
  if mesh is not None:
    return mesh
  # Each host scores its own samples on its own devices; hosts meet only through the round files.
  return parallel.data_mesh(jax.local_devices())


def _check_protocol(protocol: dict) -> None:
  missing = [k for k in REQUIRED_PROTOCOL_KEYS if k not in protocol]
  if missing:
    raise EvalProtocolError(f"The protocol lacks {missing}; every score is stored with "
                            f"{list(REQUIRED_PROTOCOL_KEYS)} so it can be reproduced.")


class _RunningTotals:
  """One host's totals over its finished rounds; saved as (and restored from) its accum_<host>.npz."""

  def __init__(self, with_logits: bool):
    self.with_logits = with_logits
    self.round_counts: list[int] = []  # samples kept in each finished round, in round order
    self.pool3: MomentAccumulator | None = None
    self.spatial: MomentAccumulator | None = None
    self.logits: list[np.ndarray] = []

  @property
  def rounds_done(self) -> int:
    return len(self.round_counts)

  @property
  def count(self) -> int:
    return self.pool3.count if self.pool3 is not None else 0

  def add_round(self, builder: StatisticsBuilder) -> None:
    kept = builder.pool3.count if builder.pool3 is not None else 0
    if kept:
      if self.pool3 is None:
        self.pool3 = MomentAccumulator(builder.pool3.dim)
        self.spatial = MomentAccumulator(builder.spatial.dim)
      # The round's moments are summed from zero and then merged, in round order, so the float64 totals
      # depend only on the rounds, not on where a run was interrupted.
      self.pool3.merge(builder.pool3)
      self.spatial.merge(builder.spatial)
      if self.with_logits:
        self.logits.append(np.concatenate(builder.logits))
    self.round_counts.append(kept)

  def all_logits(self) -> np.ndarray:
    return np.concatenate(self.logits) if self.logits else np.zeros((0, 0), np.float32)

  def save(self, path: pathlib.Path) -> None:
    arrays = {"rounds_done": np.asarray(self.rounds_done, np.int64),
              "round_counts": np.asarray(self.round_counts, np.int64),
              "count": np.asarray(self.count, np.int64), "with_logits": np.asarray(self.with_logits)}
    if self.pool3 is not None:
      arrays.update(pool3_sum=self.pool3.total, pool3_outer=self.pool3.outer,
                    spatial_sum=self.spatial.total, spatial_outer=self.spatial.outer)
    if self.with_logits:
      arrays["logits"] = self.all_logits()
    checkpoint.atomic_savez(path, **arrays)

  @classmethod
  def load(cls, path: pathlib.Path) -> _RunningTotals:
    try:
      with np.load(path, allow_pickle=False) as data:
        totals = cls(bool(data["with_logits"]))
        totals.round_counts = [int(c) for c in data["round_counts"]]
        count = int(data["count"])
        if int(data["rounds_done"]) != len(totals.round_counts) or count != sum(totals.round_counts):
          raise EvalProtocolError(f"{path} is inconsistent (finished rounds / sample counts disagree); delete "
                                  "the evaluation folder and rerun.")
        if count:
          totals.pool3 = MomentAccumulator(data["pool3_sum"].shape[0], count, data["pool3_sum"],
                                           data["pool3_outer"])
          totals.spatial = MomentAccumulator(data["spatial_sum"].shape[0], count, data["spatial_sum"],
                                             data["spatial_outer"])
          if totals.with_logits:
            totals.logits = [data["logits"]]
    except (OSError, KeyError, ValueError) as e:
      if isinstance(e, EvalProtocolError):
        raise
      raise EvalProtocolError(f"Cannot read the running totals {path} ({e}); delete the evaluation folder and "
                              "rerun.") from e
    return totals


def _kept_per_round(num_samples: int, batch_size: int, num_hosts: int, host: int, num_rounds: int) -> list[int]:
  """Samples host `host` keeps in each round: global sample order is (round, host, position in batch)."""
  per_round = batch_size * num_hosts
  return [int(np.clip(num_samples - (index * per_round + host * batch_size), 0, batch_size))
          for index in range(num_rounds)]


def balanced_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
  """Class labels for sample 0 .. num_samples - 1: every class num_samples // num_classes times (the first
  num_samples % num_classes classes once more), in an order shuffled by `seed`. ImageNet's protocol, 50 per
  class for 50,000 samples."""
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes}.")
  labels = np.tile(np.arange(num_classes, dtype=np.int32), -(-num_samples // num_classes))[:num_samples]
  return np.random.default_rng(seed).permutation(labels)


def evaluate(sample_fn: Callable[..., Any], num_samples: int, workdir, *, name: str,
             batch_size: int, inception: FIDInception, reference: FeatureStatistics | None, pipeline: str,
             protocol: dict, mesh=None, grid_size: int = 64, log: Callable[[str], None] = print,
             labels: np.ndarray | None = None) -> dict | None:
  """Samples `num_samples` images in rounds and scores them; resumable (see the module docstring).

  sample_fn(rng, batch_size) -> images in [-1, 1], NHWC, 1 or 3 channels (grey is replicated to RGB).
  labels: for class-conditional models, the label of every sample (num_samples of them, e.g.
      balanced_labels); round i of host h then calls sample_fn(rng, batch_size, labels of samples
      (i * hosts + h) * batch_size ...), so the classes are spread over hosts and rounds as listed (a last,
      partial round wraps around; its extra samples are not kept).
  batch_size: images per host per round (a multiple of the number of local devices; at least 2).
  reference: statistics of the reference set (None: no FID/sFID, only IS and the statistics).
  protocol: must hold model_checkpoint_sha256, sampler, steps, eta, guidance, seed (recorded with the scores;
      seed also seeds the sampling).
  Returns the results dict on host 0 (None on the other hosts).
  """
  preprocess.check_pipeline(pipeline)
  _check_protocol(protocol)
  if batch_size < 2:
    raise ValueError(f"batch_size must be at least 2 images per round (got {batch_size}): a round's covariance "
                     "contribution needs 2 samples.")
  if num_samples < 2:
    raise ValueError(f"num_samples must be at least 2 (got {num_samples}).")
  directory, full_protocol, num_rounds = _start_rounds(
      workdir, name, protocol, what="an evaluation", num_samples=num_samples, batch_size=batch_size,
      pipeline=pipeline, inception=inception,
      reference_statistics_sha256=reference.sha256() if reference is not None else None)
  host, num_hosts = jax.process_index(), jax.process_count()

  mesh = _local_mesh(mesh)
  num_devices = mesh.devices.size
  if batch_size % num_devices:
    raise ValueError(f"batch_size ({batch_size}) must be a multiple of the number of devices ({num_devices}).")
  base_rng = jax.random.key(int(protocol["seed"]))
  if labels is not None:
    labels = np.asarray(labels, np.int32)
    if labels.shape != (num_samples,):
      raise ValueError(f"labels must hold one label per sample, shape ({num_samples},); got {labels.shape}.")

  def images_for_round(index: int):
    rng = jax.random.fold_in(jax.random.fold_in(base_rng, index), host)
    if labels is None:
      images = sample_fn(rng, batch_size)
    else:
      start = (index * num_hosts + host) * batch_size
      images = sample_fn(rng, batch_size, labels[np.arange(start, start + batch_size) % num_samples])
    check_images(images, what="sample_fn's images")
    if np.shape(images)[0] != batch_size:
      raise ValueError(f"sample_fn returned {np.shape(images)[0]} images, asked for {batch_size}.")
    return images

  _accumulate_rounds(directory, name, num_samples, batch_size, num_rounds, images_for_round,
                     make_feature_fn(inception, pipeline, input_range="model"), inception.has_logits, mesh,
                     grid_size, log)
  if num_hosts > 1:
    multihost_utils.sync_global_devices(f"msfp_jax eval {name} rounds written")
  if host != 0:
    return None
  return _combine(directory, num_hosts, num_rounds, inception, reference, full_protocol)


def _start_rounds(workdir, name: str, protocol: dict, *, what: str, num_samples: int, batch_size: int,
                  pipeline: str, inception: FIDInception, **recorded) -> tuple[pathlib.Path, dict, int]:
  """Creates the folder of the resumable rounds `name` and records this host's full protocol there.

  The full protocol is `protocol`, what every score depends on (N, the pipeline, the batch per host and the
  number of hosts, the Inception weights), then `recorded`. Rounds in the folder under another protocol are an
  error (`what` names them): resuming them would pool samples scored two ways. Returns (the folder, the full
  protocol, the number of rounds).
  """
  directory = _eval_dir(workdir, name)
  directory.mkdir(parents=True, exist_ok=True)
  num_hosts = jax.process_count()
  full_protocol = dict(protocol)
  full_protocol.update(
      num_samples=int(num_samples), pipeline=pipeline, batch_size_per_host=int(batch_size), num_hosts=num_hosts,
      inception_weights_sha256=inception.sha256, inception_weights_format=inception.source_format, **recorded)
  protocol_json = json.dumps(full_protocol, sort_keys=True, default=str)
  protocol_path = directory / f"protocol_{jax.process_index()}.json"
  if protocol_path.exists() and protocol_path.read_text() != protocol_json:
    raise EvalProtocolError(f"{directory} holds rounds of {what} with another protocol ({protocol_path}); use "
                            "another name or delete the folder.")
  checkpoint.atomic_write_text(protocol_path, protocol_json)
  return directory, full_protocol, math.ceil(num_samples / (batch_size * num_hosts))


def _accumulate_rounds(directory: pathlib.Path, name: str, num_samples: int, batch_size: int, num_rounds: int,
                       images_for_round: Callable[[int], Any], feature_fn: Callable, with_logits: bool, mesh,
                       grid_size: int, log: Callable[[str], None], input_range: str = "model") -> None:
  """Runs this host's unfinished rounds, adding each round's features to its running-totals file."""
  host, num_hosts = jax.process_index(), jax.process_count()
  num_devices = mesh.devices.size
  grid_path = directory / "samples.png"
  accum_path = _accum_path(directory, host)
  for stale in directory.glob(f"{accum_path.name}.tmp*"):  # left by a run killed while writing
    stale.unlink(missing_ok=True)
  if any(directory.glob(f"round_{host}_*.npz")):
    log(f"eval {name}: ignoring per-round files round_{host}_*.npz of an older version of this loop "
        f"(they can be deleted); the running totals live in {accum_path.name}.")
  expected_kept = _kept_per_round(num_samples, batch_size, num_hosts, host, num_rounds)
  if accum_path.exists():
    totals = _RunningTotals.load(accum_path)
    if (totals.with_logits != with_logits or totals.rounds_done > num_rounds
        or totals.round_counts != expected_kept[:totals.rounds_done]):
      raise EvalProtocolError(f"{accum_path} does not match this evaluation's rounds; use another name or "
                              "delete the folder.")
    if totals.rounds_done:
      log(f"eval {name}: host {host} resumes after {totals.rounds_done}/{num_rounds} finished rounds")
  else:
    totals = _RunningTotals(with_logits=with_logits)

  # pylint: disable-next=g-import-not-at-top  (the clu wrapper imports TensorFlow: seconds, only when scoring)
  from msfp_jax import metrics
  progress = metrics.progress(num_rounds, None, name=f"eval {name}")
  for index in range(totals.rounds_done, num_rounds):
    keep = expected_kept[index]
    images = images_for_round(index)
    if num_devices > 1:
      images = parallel.shard_batch(images, mesh)
    out = feature_fn(images)
    raise_if_not_finite(out, what=f"images of round {index}")
    builder = StatisticsBuilder(keep_logits=with_logits)
    if keep:
      builder.add(out, keep=keep)
    if host == 0 and index == 0 and grid_size and not grid_path.exists():
      grid = np.asarray(images)[:min(grid_size, keep or batch_size)]
      save_image_grid(grid.astype(np.float32) / 127.5 - 1 if input_range == "uint8" else grid, grid_path)
    totals.add_round(builder)
    totals.save(accum_path)
    progress.report(index + 1)
    log(f"eval {name}: host {host} round {index + 1}/{num_rounds} ({keep} samples kept)")


REQUIRED_DATASET_PROTOCOL_KEYS = ("dataset", "split", "source_sha256")


def dataset_statistics(images: np.ndarray, workdir, *, name: str, batch_size: int, inception: FIDInception,
                       pipeline: str, protocol: dict, mesh=None, grid_size: int = 100,
                       log: Callable[[str], None] = print) -> tuple[FeatureStatistics, dict]:
  """Reference statistics of a dataset's uint8 NHWC images, in the resumable rounds of `evaluate`.

  Round i of host h scores images [(i * hosts + h) * batch_size, ...), so a killed run resumes after its
  last finished round and ends with the totals of an uninterrupted one. protocol must name the dataset, the
  split and the source's sha256; N, the pipeline and the Inception weights' hash are added. Returns the
  statistics and the full protocol (host 0; the other hosts return after their rounds with (None, protocol)).
  """
  preprocess.check_pipeline(pipeline)
  missing = [k for k in REQUIRED_DATASET_PROTOCOL_KEYS if k not in protocol]
  if missing:
    raise EvalProtocolError(f"The dataset protocol lacks {missing}; reference statistics record "
                            f"{list(REQUIRED_DATASET_PROTOCOL_KEYS)}.")
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"dataset_statistics takes uint8 images (got {images.dtype}).")
  check_images(images, what="dataset images")
  num_samples = len(images)
  if num_samples < 2 or batch_size < 2:
    raise ValueError(f"need at least 2 images and batch_size >= 2 (got {num_samples}, {batch_size}).")
  directory, full_protocol, num_rounds = _start_rounds(
      workdir, name, protocol, what="statistics", num_samples=num_samples, batch_size=batch_size,
      pipeline=pipeline, inception=inception)
  host, num_hosts = jax.process_index(), jax.process_count()
  mesh = _local_mesh(mesh)

  def images_for_round(index: int):
    start = (index * num_hosts + host) * batch_size
    chunk = images[start:start + batch_size]
    if len(chunk) < batch_size:  # padded so every round compiles once; the padding is not kept
      chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + images.shape[1:], np.uint8)])
    return chunk

  _accumulate_rounds(directory, name, num_samples, batch_size, num_rounds, images_for_round,
                     make_feature_fn(inception, pipeline, input_range="uint8"), False, mesh, grid_size, log,
                     input_range="uint8")
  if num_hosts > 1:
    multihost_utils.sync_global_devices(f"msfp_jax statistics {name} rounds written")
  if host != 0:
    return None, full_protocol
  pool3, spatial, _ = combine_rounds(directory, num_hosts, num_rounds, False)
  mu, sigma = pool3.mean_cov(what="pool3 features")
  mu_s, sigma_s = spatial.mean_cov(what="sFID spatial features")
  return FeatureStatistics(mu, sigma, pool3.count, mu_s, sigma_s), full_protocol


def combine_rounds(directory: pathlib.Path, num_hosts: int, num_rounds: int, with_logits: bool):
  """Merges all hosts' running totals: (pool3 moments, spatial moments, logits in (round, host) order or None).

  Every host's accum_<host>.npz must hold all `num_rounds` rounds. The logits come back in global sample
  order (round, then host), as if all hosts' samples had been scored one after another.
  """
  pool3 = spatial = None
  per_host = []
  for host in range(num_hosts):
    path = _accum_path(directory, host)
    if not path.exists():
      raise EvalProtocolError(f"Running totals {path} are missing: host {host} did not finish any round.")
    totals = _RunningTotals.load(path)
    if totals.rounds_done != num_rounds:
      raise EvalProtocolError(f"{path} holds {totals.rounds_done} rounds: host {host} did not finish round "
                              f"{totals.rounds_done} of {num_rounds}.")
    if totals.with_logits != with_logits:
      raise EvalProtocolError(f"{path} was written {'with' if totals.with_logits else 'without'} IS logits; "
                              "delete the evaluation folder and rerun.")
    if totals.count:
      if pool3 is None:
        pool3 = MomentAccumulator(totals.pool3.dim)
        spatial = MomentAccumulator(totals.spatial.dim)
      pool3.merge(totals.pool3)
      spatial.merge(totals.spatial)
    per_host.append(totals)
  if not with_logits:
    return pool3, spatial, None
  # Split each host's logits back into rounds and interleave them in (round, host) order.
  chunks = []
  for totals in per_host:
    bounds = np.cumsum(totals.round_counts)[:-1]
    chunks.append(np.split(totals.all_logits(), bounds) if totals.count else [])
  logits = [chunks[host][index] for index in range(num_rounds) for host in range(num_hosts)
            if per_host[host].round_counts[index]]
  return pool3, spatial, (np.concatenate(logits) if logits else None)


def _combine(directory, num_hosts, num_rounds, inception, reference, protocol) -> dict:
  pool3, spatial, logits = combine_rounds(directory, num_hosts, num_rounds, inception.has_logits)
  if pool3.count != protocol["num_samples"]:
    raise EvalProtocolError(f"Rounds hold {pool3.count} samples, expected {protocol['num_samples']}.")
  mu, sigma = pool3.mean_cov(what="pool3 features")
  mu_s, sigma_s = spatial.mean_cov(what="sFID spatial features")
  stats = FeatureStatistics(mu, sigma, pool3.count, mu_s, sigma_s)
  stats.save(directory / "statistics.npz")
  metrics: dict[str, Any] = {"fid": None, "sfid": None, "inception_score": None, "inception_score_std": None}
  notes = []
  if reference is not None:
    metrics["fid"] = frechet_distance(mu, sigma, reference.mu, reference.sigma)
    if reference.has_spatial:
      metrics["sfid"] = frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s)
    else:
      notes.append("sFID: the reference statistics have no spatial part (mu_s, sigma_s).")
  else:
    notes.append("FID/sFID: no reference statistics given.")
  if logits is not None and len(logits) >= IS_SPLITS:
    metrics["inception_score"], metrics["inception_score_std"] = inception_score(logits, IS_SPLITS)
  elif logits is None:
    notes.append("IS: needs the fc layer, which only pytorch-fid's pt_inception-2015-12-05-6726825d.pth has "
                 "(the TorchScript gives pool3 and sFID features only).")
  else:
    notes.append(f"IS: needs at least {IS_SPLITS} samples.")
  if metrics["fid"] is not None:
    notes.append(f"FID/sFID from {pool3.count} samples; compare only scores with the same protocol.")
  results = {"metrics": metrics, "protocol": protocol, "notes": notes,
             "statistics_sha256": stats.sha256()}
  checkpoint.atomic_write_text(directory / "results.json", json.dumps(results, indent=2, sort_keys=True, default=str))
  return results
