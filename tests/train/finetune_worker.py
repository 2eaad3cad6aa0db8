"""Runs the tiny fine-tuning job in a fresh process (own XLA_FLAGS / jax.distributed) and prints its losses.

usage: finetune_worker.py MODEL_DIR WORKDIR NUM_STEPS [--devices N] [--process I --processes P --port PORT]
"""
import argparse
import json
import os
import pathlib
import sys

parser = argparse.ArgumentParser()
parser.add_argument("model_dir")
parser.add_argument("workdir")
parser.add_argument("num_steps", type=int)
parser.add_argument("--devices", type=int, default=1)
parser.add_argument("--process", type=int, default=None)
parser.add_argument("--processes", type=int, default=1)
parser.add_argument("--port", type=int, default=0)
args = parser.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
import jax  # noqa: E402  (after XLA_FLAGS)

cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
if cache:
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from msfp_jax.train import (
  distributed,  # noqa: E402
  finetune,  # noqa: E402
)

if args.process is not None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Through the job's own launch path (checked before jax.distributed.initialize is called).
  distributed.maybe_initialize({"initialize": True, "coordinator_address": f"127.0.0.1:{args.port}",
                                "num_processes": args.processes, "process_id": args.process})
import tiny_setup  # noqa: E402

config = tiny_setup.tiny_config(args.model_dir, **{"finetune.num_steps": args.num_steps,
                                                 "finetune.checkpoint_every": args.num_steps})
result = finetune.finetune(config, args.workdir)
losses = [json.loads(line)["loss"] for line in open(pathlib.Path(args.workdir) / "metrics.jsonl")] \
    if jax.process_index() == 0 else []
print("RESULT " + json.dumps({"process": jax.process_index(), "devices": jax.device_count(), "losses": losses,
                              "b_sum": float(sum(abs(x).sum() for x in jax.tree.leaves(result.params["banks"])))}))
