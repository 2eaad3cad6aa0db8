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


def _check_coordinator(address: str) -> None:
  host, colon, port = str(address).rpartition(":")
  if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"distributed.coordinator_address (or ${_ENV['coordinator_address']}) must be host:port with "
                     f"a port in [1, 65535], e.g. 10.0.0.1:1234; got {address!r}.")


def initialize_arguments(distributed_config: Any) -> dict[str, Any] | None:
  """The keyword arguments of jax.distributed.initialize the config asks for; None: do not initialize.

  {} means auto-detection (TPU pods, SLURM, Open MPI). Raises ValueError for a partial or inconsistent set:
  coordinator_address, num_processes and process_id come all three (from the config or the environment) or
  not at all, the address is host:port, num_processes >= 1 and process_id lies in [0, num_processes).
  """
  if not distributed_config or not distributed_config.get("initialize", False):
    return None
  kwargs = {name: _value(distributed_config, name) for name in _ENV}
  given = {k: v for k, v in kwargs.items() if v is not None}
  if given and len(given) != len(kwargs):
    missing = sorted(set(kwargs) - set(given))
    raise ValueError(f"distributed: set all of coordinator_address, num_processes, process_id or none of them "
                     f"(auto-detection); missing {missing}.")
  if given:
    _check_coordinator(given["coordinator_address"])
    if given["num_processes"] < 1:
      raise ValueError(f"distributed.num_processes must be >= 1; got {given['num_processes']}.")
    if not 0 <= given["process_id"] < given["num_processes"]:
      raise ValueError(f"distributed.process_id ({given['process_id']}) must lie in [0, num_processes = "
                       f"{given['num_processes']}).")
    local = distributed_config.get("local_device_ids", None)
    if local is not None:
      given["local_device_ids"] = list(local)
  return given


def maybe_initialize(distributed_config: Any) -> None:
  """Calls jax.distributed.initialize when distributed_config.initialize is true; else does nothing.

  The arguments are checked first (`initialize_arguments`), so a bad launch fails with the field to fix
  instead of a coordinator that waits forever.
  """
  given = initialize_arguments(distributed_config)
  if given is None:
    return
  logging.info("jax.distributed.initialize(%s)", given or "auto-detect")
  jax.distributed.initialize(**given)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
