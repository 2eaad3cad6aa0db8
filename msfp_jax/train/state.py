"""The fine-tuning state and its checkpoint form.

TrainState holds what changes during fine-tuning: the step, the trainable parameters ({"banks", "router",
"quant"}), the optimizer state and the run's RNG key data. The base model weights are not in it: they are
frozen and come from the model directory.

The checkpoint form is a tree orbax stores without surprises: nested dicts of arrays (quantizer arrays keyed
"layer_0000"..., as QuantState.to_dict does, since module paths contain '/'), the optimizer state as its
flat list of leaves (restored into the structure of a freshly initialized optimizer state).
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 [], completed optimizer steps
  params: Any            # {"banks": ..., "router": ..., "quant": {"layer_0000": {...}, ...}}
  opt_state: Any
  rng: jax.Array         # uint32 key data of the run's PRNG key (data and noise derive from (seed, step))


def to_checkpoint(state: TrainState) -> dict:
  """A plain nested dict of numpy arrays."""
  leaves = jax.tree.leaves(state.opt_state)
  return {
      "step": np.asarray(state.step, np.int32),
      "rng": np.asarray(state.rng),
      "params": jax.tree.map(np.asarray, state.params),
      "opt_state": {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)},
  }


def from_checkpoint(tree: dict, template: TrainState) -> TrainState:
  """Inverse of to_checkpoint, with the structure (and dtypes) of `template`."""
  treedef = jax.tree.structure(template.opt_state)
  template_leaves = jax.tree.leaves(template.opt_state)
  saved = tree["opt_state"]
  if len(saved) != len(template_leaves):
    raise ValueError(f"The checkpoint's optimizer state has {len(saved)} arrays, this run's has "
                     f"{len(template_leaves)}: it was written by a different optimizer or model.")
  leaves = [jnp.asarray(saved[f"leaf_{i:05d}"], dtype=t.dtype) for i, t in enumerate(template_leaves)]
  params = jax.tree.map(lambda x, t: jnp.asarray(x, dtype=t.dtype), tree["params"], template.params)
  return TrainState(step=jnp.asarray(tree["step"], jnp.int32), params=params,
                    opt_state=jax.tree.unflatten(treedef, leaves), rng=jnp.asarray(tree["rng"], jnp.uint32))


def checkpoint_target(state: TrainState) -> dict:
  """ShapeDtypeStructs of the checkpoint form (the target of a restore)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), to_checkpoint(state))
