"""The ablation table: variant configs, mean/spread over seeds from the per-(variant, seed) results, and a tiny
end-to-end run that resumes, and recomputes exactly the rows whose inputs changed."""
import json
import os

import ml_collections
import numpy as np
import pytest

from msfp_jax import stage_inputs
from msfp_jax.configs import ablation as ablation_config
from msfp_jax.run import ablation
from tests.train import tiny_setup


def test_variant_config_applies_overrides_and_seed_without_touching_the_base():
  base = ablation_config.get_config()
  variant = ablation.variant_config(base, (("quant.kind", "int"), ("lora.num_banks", 1)), seed=2)
  assert (variant.quant.kind, variant.lora.num_banks, variant.seed, variant.calibration.seed) == ("int", 1, 2, 3)
  assert "ablation" not in variant
  assert (base.quant.kind, base.lora.num_banks) == ("fp", 4)
  with pytest.raises(ValueError, match="no_such_field"):
    ablation.variant_config(base, (("quant.no_such_field", 1),), seed=0)


def test_variants_are_in_the_papers_order_and_differ_by_one_step():
  names = [name for name, _, _ in ablation_config.VARIANTS]
  assert names.index("signed FP4 + LoRA") < names.index("+ mixup-sign (MSFP + LoRA)") < names.index(
      "+ TALoRA (K=4)") < names.index("+ DFA (full MSFP)")
  overrides = {name: dict(o) for name, _, o in ablation_config.VARIANTS}
  assert overrides["+ DFA (full MSFP)"] == {}
  assert overrides["+ TALoRA (K=4)"] == {"finetune.dfa_weighting": "none"}
  assert overrides["+ mixup-sign (MSFP + LoRA)"] == {"lora.num_banks": 1, "finetune.dfa_weighting": "none"}
  assert overrides["full MSFP without shortcut splitting"] == {"quant.split_shortcut": False}
  assert overrides["mixup-sign FP4 PTQ without shortcut splitting"] == {"quant.split_shortcut": False}


def _write_results(config, workdir, variants, values, seeds):
  """result.json files with the inputs the current config gives them, as a finished run leaves them."""
  entries = [("fp", "fp", ())] + [(ablation.slug(name), scored, o) for name, scored, o in variants]
  for directory, scored, overrides in entries:
    for seed in seeds:
      d = workdir / directory / f"seed_{seed}"
      d.mkdir(parents=True)
      if scored == "fp":
        inputs = ablation.fp_row_inputs(ablation.variant_config(config, (), seed), d)
      else:
        inputs = ablation.row_inputs(ablation.variant_config(config, overrides, seed), d, scored)
      mse = values[directory][seed]
      result = {"sample_mse_vs_fp": mse, "pixel_fd": 10 * mse + 1, stage_inputs.INPUTS_KEY: inputs}
      if scored != "fp":
        result["per_step"] = {"t": [500, 0], "gamma": [-0.5, -0.1], "eps_mse": [mse, 2 * mse],
                              "x_prev_mse": [0.25 * mse, 0.02 * mse]}
      (d / ablation.RESULT_FILE).write_text(json.dumps(result))


def test_summarize_reports_mean_and_sample_std_over_seeds(tmp_path):
  config = ablation_config.get_config()
  variants = [("A", "ptq", ()), ("B", "finetuned", (("quant.sign_mode", "signed"),))]
  values = {"fp": [0.0, 0.0, 0.0], "a": [0.1, 0.2, 0.4], "b": [0.05, 0.07, 0.06]}
  _write_results(config, tmp_path, variants, values, seeds=[0, 1, 2])
  table = ablation.summarize(config, tmp_path, variants, seeds=[0, 1, 2])
  rows = {row["variant"]: row for row in table["rows"]}
  assert list(rows) == ["FP (full precision)", "A", "B"]
  np.testing.assert_allclose(rows["A"]["sample_mse_vs_fp"]["mean"], np.mean(values["a"]))
  np.testing.assert_allclose(rows["A"]["sample_mse_vs_fp"]["std"], np.std(values["a"], ddof=1))
  np.testing.assert_allclose(rows["B"]["pixel_fd"]["mean"], 10 * np.mean(values["b"]) + 1)
  assert "fid" not in rows["A"] and "no FID" in table["header"]
  text = (tmp_path / "ablation.md").read_text()
  # Only the columns some row has: pixel FD and sample MSE here.
  assert "| variant | seeds | pixel FD | sample MSE vs FP |" in text
  assert "| A | 3 | 3.333 +- 1.5 | 0.2333 +- 0.15 |" in text
  assert json.loads((tmp_path / "ablation.json").read_text())["rows"][2]["seeds"] == 3
  # The per-step curves: the mean over seeds at each step, and their plot.
  np.testing.assert_allclose(rows["A"]["per_step"]["eps_mse"], [np.mean(values["a"]), 2 * np.mean(values["a"])])
  np.testing.assert_allclose(rows["B"]["per_step"]["x_prev_mse"], [0.25 * np.mean(values["b"]),
                                                                    0.02 * np.mean(values["b"])])
  assert "per_step" not in rows["FP (full precision)"] and (tmp_path / ablation.PER_STEP_PLOT).is_file()


def test_summarize_leaves_out_results_of_other_inputs_and_shows_one_seed_without_a_spread(tmp_path):
  config = ablation_config.get_config()
  variants = [("A", "ptq", ())]
  _write_results(config, tmp_path, variants, {"fp": [0.0, 0.0], "a": [0.1, 0.3]}, seeds=[0, 1])
  stale = tmp_path / "a" / "seed_1" / ablation.RESULT_FILE
  result = json.loads(stale.read_text())
  result[stage_inputs.INPUTS_KEY]["quant.act_bits"] = 8  # computed under another config
  stale.write_text(json.dumps(result))
  rows = {row["variant"]: row for row in ablation.summarize(config, tmp_path, variants, seeds=[0, 1])["rows"]}
  assert rows["A"]["seeds"] == 1 and rows["A"]["sample_mse_vs_fp"]["values"] == [0.1]
  assert "| A | 1 | 2 | 0.1 |" in (tmp_path / "ablation.md").read_text()
  # A result of an older msfp_jax, with no inputs recorded, is not reported either.
  del result[stage_inputs.INPUTS_KEY]
  stale.write_text(json.dumps(result))
  assert {r["variant"]: r["seeds"] for r in ablation.summarize(config, tmp_path, variants, [0, 1])["rows"]}["A"] == 1


def test_ptq_rows_do_not_depend_on_the_fine_tuning_fields(tmp_path):
  config = ablation_config.get_config()
  changed = ablation.variant_config(config, (("finetune.lr.lora", 1.0),), 0)
  base = ablation.variant_config(config, (), 0)
  assert ablation.row_inputs(base, tmp_path, "ptq") == ablation.row_inputs(changed, tmp_path, "ptq")
  assert ablation.row_inputs(base, tmp_path, "finetuned") != ablation.row_inputs(changed, tmp_path, "finetuned")
  # Bookkeeping changes nothing; evaluation does.
  logged = ablation.variant_config(config, (("finetune.log_every", 3),), 0)
  assert ablation.row_inputs(base, tmp_path, "finetuned") == ablation.row_inputs(logged, tmp_path, "finetuned")
  fewer = ablation.variant_config(config, (("evaluation.num_samples", 7),), 0)
  assert ablation.row_inputs(base, tmp_path, "ptq") != ablation.row_inputs(fewer, tmp_path, "ptq")


def _tiny_ablation(model_dir, **overrides):
  config = tiny_setup.tiny_config(model_dir, **{"evaluation.inception": "", **overrides})
  config.ablation = ml_collections.ConfigDict()
  config.ablation.variants = (("signed PTQ", "ptq", (("quant.sign_mode", "signed"),)),
                              ("full", "finetuned", ()))
  config.ablation.seeds = (0,)
  config.ablation.only = ()
  return config


def _mtimes(workdir):
  return {d: os.stat(workdir / d / "seed_0" / ablation.RESULT_FILE).st_mtime_ns for d in ("fp", "signed_ptq", "full")}


def test_a_rerun_skips_current_rows_and_recomputes_exactly_the_changed_ones(tmp_path, capsys):
  model_dir = tiny_setup.write_tiny_model(tmp_path / "model")
  workdir = tmp_path / "ablation"
  table = ablation.run_ablation(_tiny_ablation(model_dir), workdir)
  assert [row["seeds"] for row in table["rows"]] == [1, 1, 1]
  rows = {row["variant"]: row for row in table["rows"]}
  assert rows["signed PTQ"]["sample_mse_vs_fp"]["mean"] > 0 and rows["full"]["sample_mse_vs_fp"]["mean"] > 0
  assert len(rows["full"]["per_step"]["t"]) == 4 and (workdir / ablation.PER_STEP_PLOT).is_file()
  first = _mtimes(workdir)

  ablation.run_ablation(_tiny_ablation(model_dir, **{"finetune.log_every": 2}), workdir)
  assert _mtimes(workdir) == first  # bookkeeping only: every row is current

  capsys.readouterr()
  ablation.run_ablation(_tiny_ablation(model_dir, **{"finetune.lr.lora": 3e-2}), workdir)
  now = _mtimes(workdir)
  assert now["fp"] == first["fp"] and now["signed_ptq"] == first["signed_ptq"]
  assert now["full"] != first["full"]
  assert "finetune.lr.lora 0.01 -> 0.03" in capsys.readouterr().out
  # The stale row's folder, fine-tuning checkpoints included, was set aside and not reused.
  assert (workdir / "full" / "seed_0.stale" / ablation.RESULT_FILE).is_file()
  stale = json.loads((workdir / "full" / "seed_0.stale" / ablation.RESULT_FILE).read_text())
  fresh = json.loads((workdir / "full" / "seed_0" / ablation.RESULT_FILE).read_text())
  assert fresh[stage_inputs.INPUTS_KEY]["finetune.lr.lora"] == 3e-2
  assert fresh["sample_mse_vs_fp"] != stale["sample_mse_vs_fp"]


def test_fd_to_fp_uses_the_seeds_fp_features_which_are_computed_again_when_missing(tmp_path, fid_torchscript_path):
  model_dir = tiny_setup.write_tiny_model(tmp_path / "model")
  workdir = tmp_path / "ablation"
  config = _tiny_ablation(model_dir, **{"evaluation.inception": str(fid_torchscript_path),
                                        "evaluation.reference": "builtin:cifar10-test"})
  config.ablation.variants = config.ablation.variants[:1]
  table = ablation.run_ablation(config, workdir)
  rows = {row["variant"]: row for row in table["rows"]}
  assert rows["signed PTQ"]["fd_to_fp"]["mean"] > 0 and rows["signed PTQ"]["fid"]["mean"] > 0
  assert "fd_to_fp" not in rows["FP (full precision)"] and rows["FP (full precision)"]["fid"]["mean"] > 0
  fp_result = workdir / "fp" / "seed_0" / ablation.RESULT_FILE
  row_result = workdir / "signed_ptq" / "seed_0" / ablation.RESULT_FILE
  before = (os.stat(fp_result).st_mtime_ns, os.stat(row_result).st_mtime_ns)
  # As on a new machine with the committed result.json files only: the FP features are made again, the row kept.
  (workdir / "fp" / "seed_0" / "eval" / "fp" / "statistics.npz").unlink()
  table = ablation.run_ablation(config, workdir)
  assert os.stat(fp_result).st_mtime_ns != before[0] and os.stat(row_result).st_mtime_ns == before[1]
  assert (workdir / "fp" / "seed_0" / "eval" / "fp" / "statistics.npz").is_file()
  assert {row["variant"]: row["seeds"] for row in table["rows"]} == {"FP (full precision)": 1, "signed PTQ": 1}


def test_report_mode_prints_the_finished_rows_and_computes_nothing(tmp_path, capsys):
  from msfp_jax import run as run_lib
  config = ablation_config.get_config()
  variants = [(name, scored, o) for name, scored, o in config.ablation.variants[:2]]
  _write_results(config, tmp_path, variants, {"fp": [0.0], "int4_ptq_int_baseline": [0.2],
                                               "signed_fp4_ptq": [0.05]}, seeds=[0])
  config.unlock()
  config.ablation.seeds = (0, 1)
  config.ablation.only = tuple(name for name, _, _ in variants)
  config.lock()
  files_before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  run_lib.run_job(config, tmp_path, "report")
  out = capsys.readouterr().out
  assert "| INT4 PTQ (INT baseline) | 1 | 3 | 0.2 |" in out and "| signed FP4 PTQ | 1 | 1.5 | 0.05 |" in out
  # Only the table was written: no row was started for seed 1.
  new = set(sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))) - set(files_before)
  assert {str(p) for p in new} <= {"ablation.md", "ablation.json", "per_step_eps_errors.png", "run.lock"}
