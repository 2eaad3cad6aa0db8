"""config_record: the config a job records, and the fields a rerun of each job may change."""
from msfp_jax import config_record


def test_flatten_and_json_config():
  assert config_record.flatten({"a": {"b": 1, "c": {"d": (1, 2)}}, "e": "x"}) == {"a.b": 1, "a.c.d": (1, 2), "e": "x"}
  assert config_record.json_config({"a": (1, 2), "b": {3}}) == {"a": [1, 2], "b": [3]}


def test_differences_leave_out_what_the_job_may_change():
  saved = {"finetune": {"num_steps": 10, "lr": 1e-3}, "evaluation": {"num_samples": 4}, "sample": {"n": 1}}
  now = {"finetune": {"num_steps": 20, "lr": 1e-2}, "evaluation": {"num_samples": 6}, "sample": {"n": 2},
         "quant": {"bits": 4}}
  diffs = config_record.differences(saved, now, config_record.FINETUNE_CHECKPOINT)
  assert [d.field for d in diffs] == ["finetune.lr", "quant.bits", "sample.n"]
  assert config_record.describe(diffs[:2], config_record.CHECKPOINT_VS_NOW) == (
      "finetune.lr: checkpoint 0.001 vs now 0.01; quant.bits: checkpoint '<absent>' vs now 4")
  assert [d.field for d in config_record.differences(saved, now, config_record.MAIN_JOB_WORKDIR)] == [
      "finetune.lr", "quant.bits"]
  assert config_record.describe(config_record.differences({"train": {"num_steps": 1, "batch_size": 8}},
                                                          {"train": {"num_steps": 2, "batch_size": 16}},
                                                          config_record.TRAIN_FP_CHECKPOINT)) == (
      "train.batch_size: 8 -> 16")
  assert config_record.differences(saved, saved, config_record.Changeable()) == []
