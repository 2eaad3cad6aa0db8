"""The ablation table: variant configs, and mean/spread over seeds from the per-(variant, seed) results."""
import json

import numpy as np
import pytest

from msfp_jax.configs import ablation as ablation_config
from msfp_jax.run import ablation


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


def test_summarize_reports_mean_and_sample_std_over_seeds(tmp_path):
  config = ablation_config.get_config()
  variants = [("A", "ptq", ()), ("B", "finetuned", ())]
  values = {"fp": [0.0, 0.0, 0.0], "a": [0.1, 0.2, 0.4], "b": [0.05, 0.07, 0.06]}
  for directory, mses in values.items():
    for seed, mse in enumerate(mses):
      d = tmp_path / directory / f"seed_{seed}"
      d.mkdir(parents=True)
      (d / ablation.RESULT_FILE).write_text(json.dumps({"sample_mse_vs_fp": mse, "pixel_fd": 10 * mse + 1}))
  table = ablation.summarize(config, tmp_path, variants, seeds=[0, 1, 2])
  rows = {row["variant"]: row for row in table["rows"]}
  assert list(rows) == ["FP (full precision)", "A", "B"]
  np.testing.assert_allclose(rows["A"]["sample_mse_vs_fp"]["mean"], np.mean(values["a"]))
  np.testing.assert_allclose(rows["A"]["sample_mse_vs_fp"]["std"], np.std(values["a"], ddof=1))
  np.testing.assert_allclose(rows["B"]["pixel_fd"]["mean"], 10 * np.mean(values["b"]) + 1)
  assert "fid" not in rows["A"] and "no FID" in table["header"]
  text = (tmp_path / "ablation.md").read_text()
  # FID, sFID, IS, FD to FP, pixel FD, sample MSE, PSNR, eps MSE: what this run has, and n/a for the rest.
  assert "| A | n/a | n/a | n/a | n/a | 3.333 +- 1.5 | 0.2333 +- 0.15 | n/a | n/a |" in text
  assert json.loads((tmp_path / "ablation.json").read_text())["rows"][2]["seeds"] == 3
