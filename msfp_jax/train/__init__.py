"""Fine-tuning: data-free TALoRA + DFA distillation, optimizer groups, sharding, checkpoints, multi-host start."""
from msfp_jax.train.optimizer import OptimizerConfig, make_optimizer, param_groups
from msfp_jax.train.state import TrainState
