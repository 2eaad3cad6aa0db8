"""The swap-in diagnostic on a calibrated run of the tiny model: every block costs something, shares add up.

Its arithmetic is tested against a closed form in tests/evaluation/test_paired.py; here the command's wiring: the
run's own PTQ model, the sampler's steps and gammas, the JSON and PNG it leaves.
"""
import json
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "train"))
import tiny_setup  # noqa: E402


def test_swap_in_blocks_cover_the_sampler_and_their_shares_add_up(tmp_path):
  from msfp_jax.diagnostics import swap_in
  from msfp_jax.train import calibration, pipeline
  model_dir = tiny_setup.write_tiny_model(tmp_path / "model")
  config = tiny_setup.tiny_config(model_dir)
  workdir = tmp_path / "run"
  calibration.load_or_calibrate(config, workdir, bundle=pipeline.load_model(config))
  costs = swap_in.run(config, workdir, "ptq", block=3, num_images=4)
  blocks = costs["blocks"]
  assert [b["steps"] for b in blocks] == [3, 1]  # 4 DDIM steps in blocks of 3
  assert all(b["sample_mse"] > 0 for b in blocks) and costs["all_steps_mse"] > 0
  assert sum(b["cost_share"] for b in blocks) == pytest.approx(1.0)
  for weighting in ("abs", "square", "none"):
    assert sum(b["weight_share"][weighting] for b in blocks) == pytest.approx(1.0)
  assert blocks[0]["weight_share"]["none"] == pytest.approx(0.75)
  saved = json.loads((workdir / "diagnostics" / "swap_in_ptq.json").read_text())
  np.testing.assert_allclose([b["sample_mse"] for b in saved["blocks"]], [b["sample_mse"] for b in blocks])
  assert (workdir / "diagnostics" / "swap_in_ptq.png").read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(ValueError, match="ptq or finetuned"):
    swap_in.run(config, workdir, "fp")


def test_swap_in_over_seeds_gives_the_mean_and_spread_of_each_seeds_own_run(tmp_path):
  from msfp_jax.diagnostics import swap_in
  from msfp_jax.train import calibration, pipeline
  model_dir = tiny_setup.write_tiny_model(tmp_path / "model")
  config = tiny_setup.tiny_config(model_dir)
  workdir = tmp_path / "run"
  calibration.load_or_calibrate(config, workdir, bundle=pipeline.load_model(config))
  single = {seed: swap_in.run(config, workdir, "ptq", block=2, num_images=4, seeds=(seed,)) for seed in (0, 1, 2)}
  costs = swap_in.run(config, workdir, "ptq", block=2, num_images=4, seeds=(0, 1, 2))
  assert costs["seeds"] == [0, 1, 2]
  for i, block in enumerate(costs["blocks"]):
    shares = [single[s]["blocks"][i]["cost_share"] for s in (0, 1, 2)]
    np.testing.assert_allclose(block["cost_share_per_seed"], shares, rtol=1e-6)
    np.testing.assert_allclose(block["cost_share"], np.mean(shares), rtol=1e-6)
    np.testing.assert_allclose(block["cost_share_std"], np.std(shares, ddof=1), rtol=1e-6)
  assert len({round(single[s]["blocks"][0]["sample_mse"], 12) for s in (0, 1, 2)}) == 3  # other noise per seed


def test_swap_in_measures_the_samples_as_they_are_scored_clipped_to_the_image_range(tmp_path, monkeypatch):
  from msfp_jax import diffusion
  from msfp_jax.diagnostics import swap_in
  from msfp_jax.train import calibration, pipeline
  model_dir = tiny_setup.write_tiny_model(tmp_path / "model")
  config = tiny_setup.tiny_config(model_dir)
  workdir = tmp_path / "run"
  calibration.load_or_calibrate(config, workdir, bundle=pipeline.load_model(config))
  sample = diffusion.sample
  # Every sampler output blown far outside [-1, 1]: clipped, no pixel can differ by more than 2.
  monkeypatch.setattr(diffusion, "sample", lambda *a, **k: 1e3 * sample(*a, **k))
  costs = swap_in.run(config, workdir, "ptq", block=2, num_images=4)
  assert 0 < costs["all_steps_mse"] <= 4.0 and all(b["sample_mse"] <= 4.0 for b in costs["blocks"])
