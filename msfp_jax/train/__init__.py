"""Fine-tuning: data-free TALoRA + DFA distillation, optimizer groups, checkpoints, multi-host start.

    from msfp_jax.train import finetune, run_calibration
    run_calibration(config, workdir)            # workdir/calibration (data-free, from the FP sampler)
    result = finetune.finetune(config, workdir)  # resumable; workdir/metrics.jsonl, router_allocation.png
"""
from msfp_jax.train import finetune  # the module (finetune.finetune runs the stage)
from msfp_jax.train.calibration import has_calibration, load_calibration, load_or_calibrate, run_calibration
from msfp_jax.train.distributed import maybe_initialize
from msfp_jax.train.finetune import ConfigMismatchError, FinetuneResult, TrainingDivergedError, load_finetuned
from msfp_jax.train.optimizer import OptimizerConfig, make_optimizer, param_groups
from msfp_jax.train.state import TrainState

__all__ = [
    "ConfigMismatchError", "FinetuneResult", "OptimizerConfig", "TrainState", "TrainingDivergedError",
    "finetune", "has_calibration", "load_calibration", "load_finetuned", "load_or_calibrate", "make_optimizer",
    "maybe_initialize", "param_groups", "run_calibration",
]
