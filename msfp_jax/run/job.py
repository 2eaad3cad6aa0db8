"""The main job: its six stages, and `run_job(config, workdir, mode)`, what `python -m msfp_jax.main` runs.

  calibrate  data-free calibration from the FP model's own trajectories (msfp_jax.train.calibration)
  finetune   TALoRA + DFA fine-tuning, resumed from its newest checkpoint (msfp_jax.train.finetune)
  sample     the three models from the same noise (msfp_jax.run.sample)
  eval       FID / sFID / IS in resumable rounds (msfp_jax.run.evaluate)
  export     packed 4-bit codes (msfp_jax.run.export)
  report     report.json and report.md (msfp_jax.run.report)

A config with an `ablation` section runs the ablation table (msfp_jax.run.ablation) instead.
"""
from __future__ import annotations

import pathlib

from absl import app, logging

from msfp_jax import stage_inputs
from msfp_jax import validate as validate_lib
from msfp_jax.run import ablation, evaluate, export, lock, report, sample
from msfp_jax.run import stage as stage_lib
from msfp_jax.run import workdir as workdir_lib
from msfp_jax.run.models import Context
from msfp_jax.train import calibration, finetune


def _calibrate(config, workdir: pathlib.Path, context: Context) -> None:
  del context
  calibration.run_calibration(config, workdir)


def _calibrated(config, workdir: pathlib.Path) -> bool:
  del config
  return calibration.has_calibration(workdir)


def _finetune(config, workdir: pathlib.Path, context: Context) -> None:
  del context
  result = finetune.finetune(config, workdir)  # calibrates first when needed; resumes from the last checkpoint
  logging.info("fine-tuning finished at step %d (last loss %s)", result.step, result.last_loss)


def _finetuned(config, workdir: pathlib.Path) -> bool:
  """Calibrated, and the newest checkpoint is at the configured number of steps (or beyond: a smaller budget
  than the checkpoint's just uses it)."""
  step = stage_inputs.finetuned_checkpoint(workdir)["finetune_step"]
  return calibration.has_calibration(workdir) and step is not None and step >= int(config.finetune.num_steps)


def _with_models(run_stage):
  """A stage run of the sample, eval and export stages: they share the run's loaded models."""
  return lambda config, workdir, context: run_stage(config, workdir, context.models)


CALIBRATION_OUTPUTS = (calibration.SUMMARY_FILE, calibration.CALIBRATION_DIR)

STAGES: dict[str, stage_lib.Stage] = {stage.name: stage for stage in (
    stage_lib.Stage(name="calibrate", run=_calibrate, is_done=_calibrated, outputs=CALIBRATION_OUTPUTS),
    # Fine-tuning calibrates first when the workdir has no calibration (--mode=finetune alone).
    stage_lib.Stage(name="finetune", run=_finetune, is_done=_finetuned,
                    outputs=(*CALIBRATION_OUTPUTS, "metrics.jsonl", finetune.CHECKPOINT_DIR)),
    stage_lib.Stage(name="sample", run=_with_models(sample.run_sample), is_done=sample.is_done,
                    depends_on=("calibrate", "finetune"), outputs=(sample.SAMPLES_SUMMARY,)),
    stage_lib.Stage(name="eval", run=_with_models(evaluate.run_eval), is_done=evaluate.is_done,
                    depends_on=("calibrate", "finetune"), outputs=(evaluate.EVAL_SUMMARY,)),
    stage_lib.Stage(name="export", run=_with_models(export.run_export), is_done=export.is_done,
                    depends_on=("finetune",), outputs=(export.EXPORT_SUMMARY, export.EXPORT_FILE)),
    # Always runs: it only reads, and prints the report.
    stage_lib.Stage(name="report", run=report.print_report, depends_on=("sample", "eval", "export")),
)}
if tuple(STAGES) != stage_lib.PIPELINE:
  raise ImportError(f"msfp_jax.run.job defines the stages {tuple(STAGES)}, the command line knows "
                    f"{stage_lib.PIPELINE} (msfp_jax.run.stage.PIPELINE): make them the same.")
stage_lib.check_order(tuple(STAGES.values()))


def validate(config) -> None:
  """The whole config (and every ablation variant) is checked before anything is written or computed."""
  validate_lib.validate_config(config)
  if "ablation" in config and config.ablation.seeds:
    for name, _, overrides in config.ablation.variants:
      try:
        validate_lib.validate_config(ablation.variant_config(config, overrides, int(config.ablation.seeds[0])))
      except ValueError as e:
        raise validate_lib.ConfigError(f"ablation variant {name!r}: {e}") from None


def run_job(config, workdir, mode: str = "all") -> None:
  """Runs one stage (`mode`), the whole pipeline ("all") or the ablation table, and records each stage's wall time
  in workdir/timings.json.

  The config is validated first (a rejected config leaves nothing behind), then the workdir is locked for the
  run (msfp_jax.run.lock: a second process on it fails at once, naming this one) and checked to hold no run of
  another config; the config is recorded before the first stage starts.
  """
  if "ablation" in config and mode not in ("all", "ablation", "report"):
    raise app.UsageError("This config describes an ablation (it has an `ablation` section); run it with "
                         "--mode=all, or print the table of its finished rows with --mode=report.")
  validate(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with lock.hold(workdir, enabled=workdir_lib.is_lead_process()):
    if "ablation" in config:
      if mode == "report":  # the table of the rows finished so far, computing nothing
        ablation.summarize_finished(config, workdir)
      else:
        ablation.run_ablation(config, workdir)
      return
    workdir_lib.check_workdir_config(config, workdir)
    workdir_lib.record_workdir_config(config, workdir)
    names = stage_lib.PIPELINE if mode == "all" else (mode,)
    stage_lib.run_stages([STAGES[name] for name in names], config, workdir, Context(config, workdir))
