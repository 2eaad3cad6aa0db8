"""The orchestration layer: the main job's stages over one workdir, the ablation table, and the command line.

    from msfp_jax import run
    run.run_job(config, "runs/default")               # what python -m msfp_jax.main --workdir=runs/default does
    summary = run.run_sample(config, "runs/default")  # one stage's work (the models from the same noise)

Modules: stage (the Stage type and its runner: skip when current, stage times), job (the six stages,
`run_job`), workdir (the run's config record, writable or not), lock (one run per workdir), models (the three
models and their samplers), sample, evaluate, export, report (the stages after fine-tuning), protocol (the
evaluation protocol), ablation (the ablation table), command (what msfp_jax.main does with its flags).

It composes msfp_jax.train, evaluation, models, quant, lora, diffusion and data; none of them imports it.

The names below are loaded on first use: `python -m msfp_jax.main` imports msfp_jax.run.command, which must
parse the command line and refuse bad input before the stages (and tensorflow with them) are imported.
"""
import importlib

_WHERE = {
    "Stage": "stage", "STAGES": "job", "run_job": "job", "MODELS": "models", "Models": "models",
    "QuantizedSampler": "models", "run_sample": "sample", "run_eval": "evaluate", "run_export": "export",
    "run_report": "report", "eval_protocol": "protocol", "run_ablation": "ablation",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
  if name not in _WHERE:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
