"""The evaluation protocol: what every FID / sFID / IS score is stored with, so that it can be reproduced.

One builder for the eval stage (msfp_jax.run.evaluate) and the ablation table (msfp_jax.run.ablation).
msfp_jax.evaluation.evaluate adds what it knows itself (pipeline, number of samples, Inception weights hash, reference
statistics hash) and refuses to continue rounds stored under another protocol.
"""
from __future__ import annotations

from msfp_jax import stage_inputs
from msfp_jax.train import pipeline

# The evaluation draws its noise from seed + EVAL_SEED_OFFSET: other noise than the sample stage's (seed), so
# that its scores do not depend on the few images the sample stage compares pixel by pixel.
EVAL_SEED_OFFSET = 1000


def model_checkpoint_sha256(config) -> str:
  """A hash of the FP model directory's files (the protocol names the exact weights scored)."""
  return stage_inputs.tree_sha256(pipeline.model_dir(config.model.path))


def eval_seed(config) -> int:
  """The seed of the evaluation's noise and of its class labels."""
  return int(config.seed) + EVAL_SEED_OFFSET


def eval_protocol(config, *, reference: str, class_labels: bool) -> dict:
  """The protocol of an evaluation of `config`'s models against `reference` (what the reference statistics are
  of); `class_labels`: the model is class-conditional and samples balanced, shuffled labels."""
  s = config.sampler
  protocol = {"model_checkpoint_sha256": model_checkpoint_sha256(config), "sampler": s.kind,
              "steps": int(s.num_steps), "eta": float(s.eta), "guidance": float(s.guidance_scale),
              "seed": eval_seed(config), "skip": s.skip, "reference": reference}
  if class_labels:
    protocol["class_labels"] = "balanced, shuffled"
  return protocol
