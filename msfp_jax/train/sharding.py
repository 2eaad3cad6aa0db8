"""Mesh and shardings of the fine-tuning job (data parallel: batch over "data", parameters replicated).

Builds on msfp_jax.parallel (the one-axis "data" mesh). Each process feeds its own share of a global batch
(`host_local_to_global`), so the same code runs on one CPU, one GPU, a TPU pod or a GPU cluster.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from msfp_jax import parallel

DATA_AXIS = parallel.DATA_AXIS


def mesh_from_config(num_data_devices: int = -1) -> Mesh:
  """A "data" mesh over the first `num_data_devices` devices (-1: all devices of all processes)."""
  devices = jax.devices()
  if num_data_devices == -1:
    return parallel.data_mesh(devices)
  if num_data_devices < 1 or num_data_devices > len(devices):
    raise ValueError(f"mesh.data must be -1 (all devices) or in [1, {len(devices)}]; got {num_data_devices}.")
  if jax.process_count() > 1 and num_data_devices != len(devices):
    raise ValueError("With several processes the mesh must span all devices (mesh.data = -1).")
  return parallel.data_mesh(devices[:num_data_devices])


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
  return parallel.batch_sharding(mesh, batch_axis)


def replicated(mesh: Mesh) -> NamedSharding:
  return parallel.replicated_sharding(mesh)


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
  n = mesh.shape[DATA_AXIS]
  if global_batch % n:
    raise ValueError(f"finetune.batch_size ({global_batch}) must be a multiple of the number of devices on the "
                     f"'data' mesh axis ({n}).")
  if global_batch % jax.process_count():
    raise ValueError(f"finetune.batch_size ({global_batch}) must be a multiple of the number of processes "
                     f"({jax.process_count()}).")


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
  """A full copy of every leaf on every device of the mesh (works across processes for host values)."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)),
                      tree)


def to_host(tree: Any) -> Any:
  """numpy copies of (replicated or fully addressable) arrays, on every process."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils  # only needed on multi-process jobs
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)
