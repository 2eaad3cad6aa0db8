"""One process of the two-process test of msfp_jax.parallel (tests/test_parallel.py).

The launch is read from MSFP_COORDINATOR_ADDRESS / MSFP_NUM_PROCESSES / MSFP_PROCESS_ID by
msfp_jax.train.distributed.maybe_initialize, as a real multi-host launch is. Prints one `RESULT {json}` line.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
sys.path.insert(0, os.getcwd())
from msfp_jax import parallel  # noqa: E402
from msfp_jax.train import distributed  # noqa: E402

distributed.maybe_initialize({"initialize": True})
mesh = parallel.mesh_from_config(-1)
process = jax.process_index()

# The same values on every process: host numpy, and an array committed to a local device (what a jitted
# initialization or a restored state is).
params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
          "b": jax.device_put(jnp.full((3,), 0.5, jnp.float32), jax.local_devices()[0])}
replicated = parallel.replicate(params, mesh)
again = parallel.replicate(replicated, mesh)  # already global: resharded, not rebuilt from host values

global_batch = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # every process computes the same batch
from_global = parallel.host_local_to_global(global_batch, mesh)
from_rows = parallel.shard_batch(global_batch[parallel.process_rows(8)], mesh)  # every process its own rows


@jax.jit
def forward(p, x):
  return x * p["w"].sum(0) + p["b"]


out = forward(replicated, from_global)
print("RESULT " + json.dumps({
    "process": process, "process_count": jax.process_count(), "devices": jax.device_count(),
    "local_devices": jax.local_device_count(), "mesh_devices": int(mesh.devices.size),
    "replicated": all(x.sharding.is_fully_replicated and not x.is_fully_addressable
                      for x in jax.tree.leaves(replicated)),
    "w": parallel.to_host(replicated)["w"].tolist(), "b": parallel.to_host(again)["b"].tolist(),
    "rows": list(range(8))[parallel.process_rows(8)],
    "from_global": parallel.to_host(from_global).tolist(), "from_rows": parallel.to_host(from_rows).tolist(),
    "local_rows": [np.asarray(s.data).tolist() for s in from_global.addressable_shards],
    "out": parallel.to_host(out).tolist(),
}), flush=True)
