"""Multi-host start: `jax.distributed.initialize` only when the launch asks for it (big_vision style).

The launch scripts (launch/tpu_pod.sh, launch/gpu_multinode.sh) set `--config.distributed.initialize=True`.
On TPU pods and SLURM/Open MPI clusters JAX discovers the coordinator itself; elsewhere the coordinator
address, number of processes and process id come from the config or from the environment variables
MSFP_COORDINATOR_ADDRESS, MSFP_NUM_PROCESSES, MSFP_PROCESS_ID.
"""
from __future__ import annotations

import os
from typing import Any

import jax
from absl import logging

_ENV = {"coordinator_address": "MSFP_COORDINATOR_ADDRESS", "num_processes": "MSFP_NUM_PROCESSES",
        "process_id": "MSFP_PROCESS_ID"}


def _value(cfg: Any, name: str):
  value = cfg.get(name) if hasattr(cfg, "get") else getattr(cfg, name, None)
  if value in (None, "", -1):
    value = os.environ.get(_ENV[name]) or None
  if value is not None and name != "coordinator_address":
    try:
      value = int(value)
    except (TypeError, ValueError):
      raise ValueError(f"distributed.{name} (or ${_ENV[name]}) must be an integer; got {value!r}.") from None
  return value


def maybe_initialize(distributed_config: Any) -> None:
  """Calls jax.distributed.initialize when distributed_config.initialize is true; else does nothing."""
  if not distributed_config or not distributed_config.get("initialize", False):
    return
  kwargs = {name: _value(distributed_config, name) for name in _ENV}
  given = {k: v for k, v in kwargs.items() if v is not None}
  if given and len(given) != len(kwargs):
    missing = sorted(set(kwargs) - set(given))
    raise ValueError(f"distributed: set all of coordinator_address, num_processes, process_id or none of them "
                     f"(auto-detection); missing {missing}.")
  if given:
    if not 0 <= given["process_id"] < given["num_processes"]:
      raise ValueError(f"distributed.process_id ({given['process_id']}) must lie in [0, num_processes = "
                       f"{given['num_processes']}).")
    local = distributed_config.get("local_device_ids", None)
    if local is not None:
      given["local_device_ids"] = list(local)
  logging.info("jax.distributed.initialize(%s)", given or "auto-detect")
  jax.distributed.initialize(**given)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
