"""msfp_jax.train.distributed.maybe_initialize: what reaches jax.distributed.initialize, and every launch it refuses
before calling it (the real two-process start is exercised by tests/test_parallel.py)."""
import ml_collections
import pytest

from msfp_jax.train import distributed

ENV = ("MSFP_COORDINATOR_ADDRESS", "MSFP_NUM_PROCESSES", "MSFP_PROCESS_ID")


@pytest.fixture
def calls(monkeypatch):
  """The keyword arguments of every jax.distributed.initialize call (none is made for real)."""
  for name in ENV:
    monkeypatch.delenv(name, raising=False)
  made = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kwargs: made.append(kwargs))
  return made


def _config(**fields):
  config = ml_collections.ConfigDict({"initialize": True, "coordinator_address": None, "num_processes": None,
                                      "process_id": None})
  config.update(fields)
  return config


def test_nothing_happens_unless_the_launch_asks(calls):
  distributed.maybe_initialize(None)
  distributed.maybe_initialize({})
  distributed.maybe_initialize(_config(initialize=False, coordinator_address="10.0.0.1:1234", num_processes=2,
                                       process_id=0))
  assert calls == []


def test_no_fields_means_auto_detection(calls):
  distributed.maybe_initialize(_config())
  assert calls == [{}]


def test_config_fields_reach_initialize(calls):
  distributed.maybe_initialize(_config(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                                       local_device_ids=(0, 1)))
  assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
                    "local_device_ids": [0, 1]}]


def test_environment_fills_what_the_config_leaves_unset(calls, monkeypatch):
  monkeypatch.setenv("MSFP_COORDINATOR_ADDRESS", "head:8476")
  monkeypatch.setenv("MSFP_NUM_PROCESSES", "2")
  monkeypatch.setenv("MSFP_PROCESS_ID", "1")
  distributed.maybe_initialize(_config())
  distributed.maybe_initialize(_config(process_id=0))  # the config wins over the environment
  # -1 and "" count as unset (what a launch script passes when it has no value).
  distributed.maybe_initialize(_config(num_processes=-1, coordinator_address=""))
  assert calls == [{"coordinator_address": "head:8476", "num_processes": 2, "process_id": 1},
                   {"coordinator_address": "head:8476", "num_processes": 2, "process_id": 0},
                   {"coordinator_address": "head:8476", "num_processes": 2, "process_id": 1}]


@pytest.mark.parametrize("fields, message", [
    ({"coordinator_address": "10.0.0.1:1234", "num_processes": 2},
     r"set all of coordinator_address, num_processes, process_id or none of them.*missing \['process_id'\]"),
    ({"num_processes": 2, "process_id": 0}, r"missing \['coordinator_address'\]"),
    ({"coordinator_address": "10.0.0.1", "num_processes": 2, "process_id": 0}, r"must be host:port.*'10\.0\.0\.1'"),
    ({"coordinator_address": ":1234", "num_processes": 2, "process_id": 0}, "must be host:port"),
    ({"coordinator_address": "head:port", "num_processes": 2, "process_id": 0}, "must be host:port"),
    ({"coordinator_address": "head:0", "num_processes": 2, "process_id": 0}, r"port in \[1, 65535\]"),
    ({"coordinator_address": "head:65536", "num_processes": 2, "process_id": 0}, r"port in \[1, 65535\]"),
    ({"coordinator_address": "head:1234", "num_processes": 0, "process_id": 0}, "num_processes must be >= 1; got 0"),
    ({"coordinator_address": "head:1234", "num_processes": 2, "process_id": 2},
     r"process_id \(2\) must lie in \[0, num_processes = 2\)"),
    ({"coordinator_address": "head:1234", "num_processes": 2, "process_id": -3}, r"process_id \(-3\) must lie"),
])
def test_inconsistent_launches_are_refused_before_initialize(calls, fields, message):
  with pytest.raises(ValueError, match=message):
    distributed.maybe_initialize(_config(**fields))
  assert calls == [], "nothing may be started for a launch that cannot work"


def test_a_non_integer_from_the_environment_names_the_variable(calls, monkeypatch):
  monkeypatch.setenv("MSFP_COORDINATOR_ADDRESS", "head:1234")
  monkeypatch.setenv("MSFP_NUM_PROCESSES", "two")
  monkeypatch.setenv("MSFP_PROCESS_ID", "0")
  with pytest.raises(ValueError, match=r"distributed.num_processes \(or \$MSFP_NUM_PROCESSES\) must be an integer; "
                                       r"got 'two'"):
    distributed.maybe_initialize(_config())
  assert calls == []
  monkeypatch.setenv("MSFP_NUM_PROCESSES", "2")
  monkeypatch.setenv("MSFP_COORDINATOR_ADDRESS", "head")
  with pytest.raises(ValueError, match=r"\$MSFP_COORDINATOR_ADDRESS\) must be host:port"):
    distributed.maybe_initialize(_config())
