"""msfp_jax.parallel: meshes, shardings and the placement of replicated values and batches, on one process and on
two processes joined by jax.distributed (started through msfp_jax.train.distributed from the environment)."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from msfp_jax import parallel

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_meshes_from_config_and_their_errors():
  mesh = parallel.mesh_from_config(-1)
  assert mesh.axis_names == (parallel.DATA_AXIS,) and mesh.devices.size == jax.device_count()
  assert parallel.mesh_from_config(1).devices.tolist() == jax.devices()[:1]
  for bad in (0, -2, jax.device_count() + 1):
    with pytest.raises(ValueError, match=r"mesh.data must be -1 \(all devices\) or in \[1, "):
      parallel.mesh_from_config(bad)
  with pytest.raises(ValueError, match="at least one device"):
    parallel.data_mesh([])


def test_shardings_split_the_batch_axis_only():
  mesh = parallel.data_mesh()
  assert parallel.batch_sharding(mesh).spec == PartitionSpec(parallel.DATA_AXIS)
  assert parallel.batch_sharding(mesh, 1).spec == PartitionSpec(None, parallel.DATA_AXIS)
  assert parallel.replicated_sharding(mesh).spec == PartitionSpec()


def test_one_process_places_values_and_batches_and_reads_them_back():
  mesh = parallel.data_mesh()
  tree = {"w": np.arange(4, dtype=np.float32), "s": np.float32(2)}
  replicated = parallel.replicate(tree, mesh)
  assert all(x.sharding == parallel.replicated_sharding(mesh) for x in jax.tree.leaves(replicated))
  host = parallel.to_host(replicated)
  assert isinstance(host["w"], np.ndarray)
  np.testing.assert_array_equal(host["w"], tree["w"])
  batch = np.arange(12, dtype=np.float32).reshape(2, 6)
  placed = parallel.host_local_to_global(batch, mesh, batch_axis=1)
  assert placed.sharding == parallel.batch_sharding(mesh, 1)
  np.testing.assert_array_equal(parallel.to_host(placed), batch)
  np.testing.assert_array_equal(parallel.to_host(parallel.shard_batch({"x": batch.T}, mesh))["x"], batch.T)
  assert parallel.process_rows(8) == slice(0, 8)


def test_batch_sizes_that_do_not_split_are_refused_naming_the_count(monkeypatch):
  import types
  four_devices = types.SimpleNamespace(shape={parallel.DATA_AXIS: 4})  # only its axis size is read
  parallel.check_global_batch(8, four_devices)
  with pytest.raises(ValueError, match=r"finetune.batch_size \(6\) must be a multiple of the number of devices on "
                                       r"the 'data' mesh axis \(4\)"):
    parallel.check_global_batch(6, four_devices)
  with pytest.raises(ValueError, match=r"the batch size \(None\) must be a multiple"):  # a scalar has no batch
    parallel.shard_batch(np.float32(1), parallel.data_mesh())
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  with pytest.raises(ValueError, match=r"batch_size \(8\) must be a multiple of the number of processes \(3\)"):
    parallel.check_global_batch(8, four_devices)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_processes():
  """The RESULT of tests/parallel_worker.py in each of two processes with two CPU devices each."""
  port = _free_port()
  procs = []
  for process_id in range(2):
    env = dict(os.environ, MSFP_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MSFP_NUM_PROCESSES="2",
               MSFP_PROCESS_ID=str(process_id))
    procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "parallel_worker.py")], cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  results = []
  for proc in procs:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
  return sorted(results, key=lambda r: r["process"])


def test_two_processes_form_one_mesh_over_all_devices(two_processes):
  for process_id, result in enumerate(two_processes):
    assert result["process"] == process_id and result["process_count"] == 2
    assert (result["devices"], result["local_devices"], result["mesh_devices"]) == (4, 2, 4)


def test_replicate_makes_global_copies_from_host_and_committed_values(two_processes):
  for result in two_processes:
    assert result["replicated"], "every leaf spans both processes' devices, fully replicated"
    assert result["w"] == np.arange(6).reshape(2, 3).tolist() and result["b"] == [0.5] * 3


def test_each_process_feeds_its_rows_of_the_global_batch(two_processes):
  batch = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  assert [r["rows"] for r in two_processes] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  for process_id, result in enumerate(two_processes):
    assert result["from_global"] == batch.tolist() == result["from_rows"]
    # Its two devices hold exactly its own rows, two each.
    assert result["local_rows"] == [batch[4 * process_id:4 * process_id + 2].tolist(),
                                    batch[4 * process_id + 2:4 * process_id + 4].tolist()]
    expected = batch * np.arange(6).reshape(2, 3).sum(0) + 0.5
    np.testing.assert_allclose(result["out"], expected)
