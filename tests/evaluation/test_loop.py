"""The resumable evaluation loop: interruption + rerun equals an uninterrupted run; protocol; bad input.

The loop's mechanics are tested with a small stand-in for the Inception network (the same outputs with
smaller feature dimensions, so the float64 eigen-decompositions stay cheap); the real network is tested
in tests/models/test_inception.py and, through the same feature function, in tests/evaluation/test_reference.py.
"""
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msfp_jax.evaluation import loop
from msfp_jax.evaluation.features import NonFiniteImagesError
from msfp_jax.evaluation.inception_weights import FIDInception
from msfp_jax.evaluation.stats import FeatureStatistics, FewSamplesWarning, frechet_distance, inception_score

PROTOCOL = {"model_checkpoint_sha256": "abc123", "sampler": "ddim", "steps": 20, "eta": 0.0, "guidance": None,
            "seed": 3}


POOL3, SPATIAL = 64, 48


class TinyFIDStandIn(nn.Module):
  with_logits: bool = True

  @nn.compact
  def __call__(self, x):
    h = nn.avg_pool(x, (23, 23), (23, 23)).reshape(x.shape[0], -1)  # 299 -> 13x13x3
    out = {"pool3": nn.relu(nn.Dense(POOL3)(h)), "spatial": nn.relu(nn.Dense(SPATIAL)(h))}
    if self.with_logits:
      out["logits"] = nn.Dense(100, use_bias=False)(h)
    return out


def _stand_in(with_logits=True):
  model = TinyFIDStandIn(with_logits)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 299, 299, 3)))
  return FIDInception(model=model, variables=variables, sha256="f" * 64, source_format="test", path="<test>")


def _sample_fn(rng, batch_size, channels=3):
  return jax.random.uniform(rng, (batch_size, 8, 8, channels), minval=-1, maxval=1)


@pytest.fixture(scope="module")
def net():
  return _stand_in()


@pytest.fixture(scope="module")
def reference_stats():
  rng = np.random.RandomState(0)
  a = rng.normal(size=(POOL3, POOL3)) * 0.1
  b = rng.normal(size=(SPATIAL, SPATIAL)) * 0.1
  return FeatureStatistics(rng.normal(size=POOL3), a @ a.T + np.eye(POOL3), 100, rng.normal(size=SPATIAL),
                           b @ b.T + np.eye(SPATIAL))


def _evaluate(workdir, net, reference_stats, sample_fn=_sample_fn, **kw):
  args = dict(name="cifar", batch_size=4, inception=net, reference=reference_stats, pipeline="tf",
              protocol=PROTOCOL, log=lambda _: None)
  args.update(kw)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FewSamplesWarning)
    return loop.evaluate(sample_fn, kw.pop("num_samples", 10), workdir, **{k: v for k, v in args.items()
                                                                          if k != "num_samples"})


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, net, reference_stats):
  full = _evaluate(tmp_path / "a", net, reference_stats)

  calls = []

  def failing(rng, batch_size):
    calls.append(1)
    if len(calls) == 2:
      raise KeyboardInterrupt("preempted in round 1")
    return _sample_fn(rng, batch_size)

  with pytest.raises(KeyboardInterrupt):
    _evaluate(tmp_path / "b", net, reference_stats, sample_fn=failing)
  eval_dir = tmp_path / "b" / "eval" / "cifar"
  # One running-total file per host, holding round 0 only; no per-round files, no leftover temporaries.
  assert sorted(p.name for p in eval_dir.iterdir()) == ["accum_0.npz", "protocol_0.json", "samples.png"]
  with np.load(eval_dir / "accum_0.npz") as data:
    assert int(data["rounds_done"]) == 1 and int(data["count"]) == 4 and data["logits"].shape == (4, 100)

  resumed_calls = []

  def counting(rng, batch_size):
    resumed_calls.append(1)
    return _sample_fn(rng, batch_size)

  resumed = _evaluate(tmp_path / "b", net, reference_stats, sample_fn=counting)
  assert len(resumed_calls) == 2  # rounds 1 and 2 only; 10 samples = 4 + 4 + 2
  assert resumed["metrics"] == full["metrics"]
  assert resumed["statistics_sha256"] == full["statistics_sha256"]
  assert sorted(p.name for p in eval_dir.iterdir()) == ["accum_0.npz", "protocol_0.json", "results.json",
                                                       "samples.png", "statistics.npz"]
  for key in ("mu", "sigma", "mu_s", "sigma_s"):
    a = np.load(tmp_path / "a" / "eval" / "cifar" / "statistics.npz")[key]
    b = np.load(tmp_path / "b" / "eval" / "cifar" / "statistics.npz")[key]
    np.testing.assert_array_equal(a, b)


def _accum_bytes(workdir):
  return (workdir / "eval" / "cifar" / "accum_0.npz").stat().st_size


def test_disk_use_independent_of_number_of_rounds(tmp_path, net, reference_stats):
  # The same 12 samples in 6 rounds of 2 and in 2 rounds of 6: the running-total file has the same size
  # (up to the 8-byte per-round sample counts), so disk use does not grow with the number of rounds.
  _evaluate(tmp_path / "many", net, reference_stats, num_samples=12, batch_size=2)
  _evaluate(tmp_path / "few", net, reference_stats, num_samples=12, batch_size=6)
  many, few = _accum_bytes(tmp_path / "many"), _accum_bytes(tmp_path / "few")
  assert abs(many - few) <= 8 * 4
  moments = 8 * (POOL3 * POOL3 + POOL3 + SPATIAL * SPATIAL + SPATIAL)  # one set of float64 moments
  assert moments + 4 * 12 * 100 <= many < moments + 4 * 12 * 100 + 4096  # + the IS logits + npz headers
  assert not list((tmp_path / "many" / "eval" / "cifar").glob("round_*"))


def test_two_hosts_combined_in_global_sample_order(tmp_path, net, reference_stats, monkeypatch):
  # Two hosts simulated one after the other in this process (they share the workdir, as on a shared disk).
  from jax.experimental import multihost_utils

  monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: None)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  results = {}
  for host in (1, 0):  # host 0 combines, so it runs last
    monkeypatch.setattr(jax, "process_index", lambda host=host: host)
    results[host] = _evaluate(tmp_path, net, reference_stats, num_samples=11, batch_size=2)
  assert results[1] is None
  # Direct: global sample order is (round, host); 11 = 3 rounds x 2 hosts x 2 - 1 (host 1 keeps 1 in round 2).
  base = jax.random.key(PROTOCOL["seed"])
  images = jnp.concatenate([_sample_fn(jax.random.fold_in(jax.random.fold_in(base, i), h), 2)
                            for i in range(3) for h in range(2)])[:11]
  from msfp_jax.evaluation.features import make_feature_fn
  out = jax.tree.map(np.asarray, make_feature_fn(net, "tf")(images))
  pool3 = out["pool3"].astype(np.float64)
  expected_fid = frechet_distance(pool3.mean(0), np.cov(pool3, rowvar=False), reference_stats.mu,
                                  reference_stats.sigma)
  metrics = results[0]["metrics"]
  assert metrics["fid"] == pytest.approx(expected_fid, rel=1e-6)
  # IS splits the logits in order, so this also checks the (round, host) interleaving.
  assert metrics["inception_score"] == pytest.approx(inception_score(out["logits"], 10)[0], rel=1e-6)
  assert results[0]["protocol"]["num_hosts"] == 2
  assert sorted(p.name for p in (tmp_path / "eval" / "cifar").glob("accum_*")) == ["accum_0.npz", "accum_1.npz"]


def test_scores_and_protocol_against_direct_computation(tmp_path, net, reference_stats):
  results = _evaluate(tmp_path, net, reference_stats, num_samples=12)
  # Direct: the same 12 images (rounds of 4 with the loop's per-round keys), features in one batch.
  base = jax.random.key(PROTOCOL["seed"])
  images = jnp.concatenate([_sample_fn(jax.random.fold_in(jax.random.fold_in(base, i), 0), 4) for i in range(3)])
  from msfp_jax.evaluation.features import make_feature_fn
  out = jax.tree.map(np.asarray, make_feature_fn(net, "tf")(images))
  pool3 = out["pool3"].astype(np.float64)
  expected_fid = frechet_distance(pool3.mean(0), np.cov(pool3, rowvar=False), reference_stats.mu,
                                  reference_stats.sigma)
  metrics = results["metrics"]
  assert metrics["fid"] == pytest.approx(expected_fid, rel=1e-6)
  assert metrics["inception_score"] == pytest.approx(inception_score(out["logits"], 10)[0], rel=1e-6)
  assert metrics["sfid"] is not None
  saved = json.loads((tmp_path / "eval" / "cifar" / "results.json").read_text())
  protocol = saved["protocol"]
  for key, value in PROTOCOL.items():
    assert protocol[key] == value
  assert protocol["num_samples"] == 12 and protocol["pipeline"] == "tf"
  assert protocol["inception_weights_sha256"] == "f" * 64
  assert protocol["reference_statistics_sha256"] == reference_stats.sha256()
  assert (tmp_path / "eval" / "cifar" / "samples.png").is_file()


def test_grey_samples_replicated_and_is_note_without_fc(tmp_path, reference_stats):
  results = _evaluate(tmp_path, _stand_in(with_logits=False), reference_stats,
                      sample_fn=lambda rng, b: _sample_fn(rng, b, channels=1), num_samples=4)
  assert results["metrics"]["inception_score"] is None
  assert any("pytorch-fid" in note for note in results["notes"])
  assert results["metrics"]["fid"] is not None


def test_bad_input(tmp_path, net, reference_stats):
  with pytest.raises(loop.EvalProtocolError, match="lacks \\['seed'\\]"):
    _evaluate(tmp_path, net, reference_stats, protocol={k: v for k, v in PROTOCOL.items() if k != "seed"})
  with pytest.raises(ValueError, match="at least 2 images per round"):
    _evaluate(tmp_path, net, reference_stats, batch_size=1)
  with pytest.raises(ValueError, match="got 4 channels|got 4 \\("):
    _evaluate(tmp_path / "c4", net, reference_stats, sample_fn=lambda rng, b: _sample_fn(rng, b, channels=4))
  with pytest.raises(NonFiniteImagesError, match="NaN"):
    _evaluate(tmp_path / "nan", net, reference_stats, sample_fn=lambda rng, b: jnp.full((b, 8, 8, 3), jnp.nan))
  _evaluate(tmp_path / "p", net, reference_stats, num_samples=4)
  with pytest.raises(loop.EvalProtocolError, match="another protocol"):
    _evaluate(tmp_path / "p", net, reference_stats, num_samples=4, protocol=dict(PROTOCOL, seed=4))


def _dataset_statistics(workdir, net, images, **kw):
  args = dict(name="ref", batch_size=4, inception=net, pipeline="tf", log=lambda _: None,
              protocol={"dataset": "toy", "split": "train", "source_sha256": "0" * 64})
  args.update(kw)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", FewSamplesWarning)
    return loop.dataset_statistics(images, workdir, **args)


def test_dataset_statistics_resume_and_equal_a_direct_computation(tmp_path, net, monkeypatch):
  images = np.random.RandomState(1).randint(0, 256, (10, 8, 8, 3)).astype(np.uint8)
  full, protocol = _dataset_statistics(tmp_path / "a", net, images)
  assert full.count == 10 and protocol["num_samples"] == 10 and protocol["pipeline"] == "tf"
  assert protocol["inception_weights_sha256"] == net.sha256 and protocol["source_sha256"] == "0" * 64

  # Direct float64 moments of the stand-in's features of the same images.
  from msfp_jax.evaluation.features import make_feature_fn
  out = make_feature_fn(net, "tf", input_range="uint8")(images)
  pool3 = np.asarray(out["pool3"], np.float64)
  np.testing.assert_allclose(full.mu, pool3.mean(0), rtol=1e-10)
  np.testing.assert_allclose(full.sigma, np.cov(pool3, rowvar=False), rtol=1e-8, atol=1e-10)

  # Killed in round 1, then rerun: only rounds 1 and 2 are scored, and the totals are bit-identical.
  calls, interrupt_at = [], [1]
  real_accumulate = loop._accumulate_rounds

  def interrupted(directory, name, num_samples, batch_size, num_rounds, images_for_round, *rest, **kw):
    def counted(index):
      calls.append(index)
      if index in interrupt_at:
        raise KeyboardInterrupt("preempted")
      return images_for_round(index)
    return real_accumulate(directory, name, num_samples, batch_size, num_rounds, counted, *rest, **kw)

  monkeypatch.setattr(loop, "_accumulate_rounds", interrupted)
  with pytest.raises(KeyboardInterrupt):
    _dataset_statistics(tmp_path / "b", net, images)
  assert calls == [0, 1]
  calls.clear()
  interrupt_at.clear()
  resumed, _ = _dataset_statistics(tmp_path / "b", net, images)
  assert calls == [1, 2]
  np.testing.assert_array_equal(resumed.sigma, full.sigma)
  np.testing.assert_array_equal(resumed.mu_s, full.mu_s)

  with pytest.raises(loop.EvalProtocolError, match="another protocol"):
    _dataset_statistics(tmp_path / "b", net, images, pipeline="pytorch-fid")
  with pytest.raises(loop.EvalProtocolError, match="lacks"):
    _dataset_statistics(tmp_path / "c", net, images, protocol={"dataset": "toy"})
  with pytest.raises(ValueError, match="uint8"):
    _dataset_statistics(tmp_path / "d", net, images.astype(np.float32))


def test_balanced_labels_give_every_class_its_share_in_a_seeded_shuffle():
  labels = loop.balanced_labels(1000, 10, seed=3)
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 100))
  assert not np.array_equal(labels, np.sort(labels))  # shuffled, not class after class
  np.testing.assert_array_equal(labels, loop.balanced_labels(1000, 10, seed=3))
  assert not np.array_equal(labels, loop.balanced_labels(1000, 10, seed=4))
  # ImageNet's protocol: 50 per class for 50,000 samples; a remainder goes one each to the first classes.
  np.testing.assert_array_equal(np.bincount(loop.balanced_labels(50_000, 1000, 0)), np.full(1000, 50))
  np.testing.assert_array_equal(np.bincount(loop.balanced_labels(1003, 10, 0)), [101] * 3 + [100] * 7)


def test_evaluate_hands_each_round_its_slice_of_the_labels(tmp_path, net, reference_stats):
  labels = loop.balanced_labels(10, 5, seed=0)
  seen = []

  def conditional(rng, batch_size, round_labels):
    seen.append(np.asarray(round_labels))
    return _sample_fn(rng, batch_size)
  _evaluate(tmp_path, net, reference_stats, sample_fn=conditional, labels=labels)
  # 10 samples in rounds of 4: the third round takes samples 8, 9 and wraps (its last two are not kept).
  np.testing.assert_array_equal(np.concatenate(seen)[:10], labels)
  np.testing.assert_array_equal(seen[-1], labels[[8, 9, 0, 1]])
  with pytest.raises(ValueError, match="one label per sample"):
    _evaluate(tmp_path / "bad", net, reference_stats, sample_fn=conditional, labels=labels[:9])
