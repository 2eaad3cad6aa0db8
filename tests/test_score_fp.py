"""score_fp: per-seed FID / sFID of a model's own samples against shipped statistics, mean +- std, resumable."""
import json

import jax
import numpy as np
import pytest

from msfp_jax import evaluation, score_fp
from msfp_jax.models import build_model, save_converted


@pytest.fixture(scope="module")
def tiny_cifar_model(tmp_path_factory):
  config = dict(resolution=32, in_channels=3, out_channels=3, ch=8, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(16,), dropout=0.0, num_groups=2)
  model, _ = build_model("ddpm_unet", config)
  params = model.init(jax.random.key(0), *model.example_inputs(1))["params"]
  path = tmp_path_factory.mktemp("model")
  save_converted(path, "ddpm_unet", config, params,
                 extra_config={"schedule": {"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
                                            "beta_end": 0.02}, "training": {"steps": 7}})
  return path


def test_scores_per_seed_with_mean_and_std_and_resumes(tmp_path, tiny_cifar_model, fid_torchscript_path):
  args = dict(inception_path=str(fid_torchscript_path), workdir=tmp_path, num_samples=4, seeds=[0, 1],
              num_steps=2, batch_size=2)
  summary = score_fp.score(str(tiny_cifar_model), "builtin:cifar10-test", **args)
  fids = [summary["per_seed"][s]["fid"] for s in ("0", "1")]
  assert all(np.isfinite(fids)) and fids[0] != fids[1]  # other noise, other samples
  assert summary["fid"] == pytest.approx(np.mean(fids), rel=1e-12)
  assert summary["fid_std"] == pytest.approx(np.std(fids, ddof=1), rel=1e-12)
  assert summary["protocol"]["reference_protocol"]["split"] == "test"
  assert summary["training"]["steps"] == 7
  assert json.loads((tmp_path / "scores.json").read_text())["fid"] == summary["fid"]

  # A rerun reuses the finished rounds: the same numbers, nothing new sampled.
  calls = []
  original = score_fp.model_sample_fn

  def counting(*a, **k):
    fn, meta = original(*a, **k)
    return (lambda rng, n: calls.append(n) or fn(rng, n)), meta
  score_fp.model_sample_fn = counting
  try:
    again = score_fp.score(str(tiny_cifar_model), "builtin:cifar10-test", **args)
  finally:
    score_fp.model_sample_fn = original
  assert again["per_seed"] == summary["per_seed"] and not calls

  # Another sampler in the same workdir is refused, not mixed into the finished rounds.
  with pytest.raises(evaluation.EvalProtocolError, match="another protocol"):
    score_fp.score(str(tiny_cifar_model), "builtin:cifar10-test", **{**args, "num_steps": 3})


def test_command_line_errors_are_one_line(tmp_path, capsys):
  with pytest.raises(SystemExit, match="--seeds 'a,b': give comma-separated integers"):
    score_fp.main(["--model", "x", "--reference", "y", "--workdir", str(tmp_path), "--seeds", "a,b"])
  with pytest.raises(SystemExit, match="--grid needs --archive"):
    score_fp.main(["--model", "x", "--reference", "y", "--workdir", str(tmp_path), "--grid", "g.png"])
  with pytest.raises(SystemExit, match="no such file; `bash launch/fetch_fid_network.sh`"):
    score_fp.main(["--model", "x", "--reference", "y", "--workdir", str(tmp_path), "--inception",
                   str(tmp_path / "none.pt")])
