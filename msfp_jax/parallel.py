"""Data parallelism over a one-axis device mesh ("data").

The batch dimension (axis 0) of inputs is split over the "data" axis; parameters are replicated.
Everything goes through `jax.jit` with `NamedSharding` in/out shardings (no pmap, no pjit).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with one axis, "data", over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("data_mesh needs at least one device.")
  # Built directly (not jax.make_mesh, whose axes default to Explicit in jax 0.10): Auto sharding lets
  # the partitioner propagate the batch sharding through model code that knows nothing of meshes.
  return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


def batch_sharding(mesh: Mesh, ndim_before_batch: int = 0) -> NamedSharding:
  """Sharding that splits axis `ndim_before_batch` (the batch axis) over "data"."""
  return NamedSharding(mesh, PartitionSpec(*([None] * ndim_before_batch), DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _check_divisible(x, mesh: Mesh, what: str = "batch") -> None:
  n = mesh.shape[DATA_AXIS]
  size = np.shape(x)[0] if np.ndim(x) else None
  if size is None or size % n:
    raise ValueError(
        f"the {what} size ({size}) must be a multiple of the number of devices on the 'data' mesh axis "
        f"({n}); change the batch size or pass a mesh over fewer devices.")


def shard_batch(x: Any, mesh: Mesh) -> Any:
  """Places every leaf of `x` with its axis 0 split over the mesh's "data" axis.

  With several processes, each process passes its own share (its local rows) and gets back the global
  array made from all processes' shares.
  """
  sharding = batch_sharding(mesh)

  def put(leaf):
    if jax.process_count() > 1:
      return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))
    _check_divisible(leaf, mesh)
    return jax.device_put(leaf, sharding)

  return jax.tree.map(put, x)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a full copy of every leaf of `tree` on every device of `mesh`."""
  return jax.device_put(tree, replicated_sharding(mesh))
