"""Data parallelism over a one-axis device mesh ("data"), on one process or several.

The batch dimension of inputs is split over the "data" axis; parameters are replicated. Everything goes
through `jax.jit` with `NamedSharding` in/out shardings (no pmap, no pjit). The same code runs on one CPU,
one GPU, a TPU pod or a GPU cluster: with several processes (msfp_jax.train.distributed), every array here is
a global jax.Array made from what each process holds, without any cross-process transfer:

  * `replicate`: every process passes the same value (parameters, an optimizer state);
  * `shard_batch`: every process passes its own rows (its share of the batch);
  * `host_local_to_global`: every process passes the same global batch and contributes only its rows.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
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


def mesh_from_config(num_data_devices: int = -1) -> Mesh:
  """A "data" mesh over the first `num_data_devices` devices (config field mesh.data; -1: all of all processes)."""
  devices = jax.devices()
  if num_data_devices == -1:
    return data_mesh(devices)
  if num_data_devices < 1 or num_data_devices > len(devices):
    raise ValueError(f"mesh.data must be -1 (all devices) or in [1, {len(devices)}]; got {num_data_devices}.")
  if jax.process_count() > 1 and num_data_devices != len(devices):
    raise ValueError("With several processes the mesh must span all devices (mesh.data = -1).")
  return data_mesh(devices[:num_data_devices])


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  """Sharding that splits axis `batch_axis` over "data" (the axes before it, e.g. time, stay whole)."""
  return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _check_divisible(x, mesh: Mesh, what: str = "batch") -> None:
  n = mesh.shape[DATA_AXIS]
  size = np.shape(x)[0] if np.ndim(x) else None
  if size is None or size % n:
    raise ValueError(
        f"the {what} size ({size}) must be a multiple of the number of devices on the 'data' mesh axis "
        f"({n}); change the batch size or pass a mesh over fewer devices.")


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
  """finetune.batch_size must split evenly over the mesh's devices and over the processes."""
  n = mesh.shape[DATA_AXIS]
  if global_batch % n:
    raise ValueError(f"finetune.batch_size ({global_batch}) must be a multiple of the number of devices on the "
                     f"'data' mesh axis ({n}).")
  if global_batch % jax.process_count():
    raise ValueError(f"finetune.batch_size ({global_batch}) must be a multiple of the number of processes "
                     f"({jax.process_count()}).")


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


def process_rows(global_batch: int) -> slice:
  """The rows of a global batch this process feeds (its devices' share, in process order)."""
  per_process = global_batch // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def host_local_to_global(global_array: np.ndarray, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
  """Makes a global jax.Array sharded over "data" from this process's rows of `global_array`.

  Every process computes (cheaply) the same global numpy batch as a pure function of (seed, step) and
  contributes only its own rows; on one process this is a plain device_put.
  """
  sharding = batch_sharding(mesh, batch_axis)
  if jax.process_count() == 1:
    return jax.device_put(global_array, sharding)
  rows = process_rows(global_array.shape[batch_axis])
  index = [slice(None)] * global_array.ndim
  index[batch_axis] = rows
  local = np.ascontiguousarray(global_array[tuple(index)])
  return jax.make_array_from_process_local_data(sharding, local, global_array.shape)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A full copy of every leaf of `tree` on every device of `mesh`; every process must pass the same values.

  On one process this is `jax.device_put`. With several, each leaf becomes a global array built from this
  process's copy (`jax.make_array_from_process_local_data`: no communication). `jax.device_put` cannot stand in
  for it there: on a host value it first compares the value across all processes (one collective per leaf),
  and an array already committed to a local device (the output of a jitted function or of device_put: what a
  freshly initialized state is) it takes for a cross-host transfer, which the CPU backend refuses (jax 0.10:
  "does not support cross-host device transfers"; tests/test_parallel.py runs this on two processes). A leaf
  that is already a global array (not fully addressable) is resharded by device_put, which handles that case.
  """
  sharding = replicated_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def put(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return jax.device_put(leaf, sharding)
    local = np.asarray(leaf)
    return jax.make_array_from_process_local_data(sharding, local, local.shape)

  return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
  """numpy copies of (replicated or fully addressable) arrays, on every process."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)
