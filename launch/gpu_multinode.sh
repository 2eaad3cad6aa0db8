#!/usr/bin/env bash
# Start one msfp_jax process on this node of a multi-node GPU job. Run the same command on every node with that
# node's PROCESS_ID (SLURM: srun sets it from SLURM_PROCID when PROCESS_ID is unset).
#
# Exact command (node 0 of 2; on node 1 use PROCESS_ID=1):
#   COORDINATOR_ADDRESS=10.0.0.1:12345 NUM_PROCESSES=2 PROCESS_ID=0 \
#   bash launch/gpu_multinode.sh python -m msfp_jax.main --config=configs/lsun_bedroom.py:w4a4 \
#       --workdir=/shared/runs/lsun_bedroom_w4a4 --mode=finetune
#
# COORDINATOR_ADDRESS is host:port of process 0 (reachable from every node); NUM_PROCESSES the number of
# processes (one per node, each driving all its local GPUs); PROCESS_ID this node's index in [0, NUM_PROCESSES).
# All three are checked before start, then passed to jax.distributed.initialize through the config.
set -euo pipefail

PROCESS_ID="${PROCESS_ID:-${SLURM_PROCID:-${OMPI_COMM_WORLD_RANK:-}}}"
NUM_PROCESSES="${NUM_PROCESSES:-${SLURM_NTASKS:-${OMPI_COMM_WORLD_SIZE:-}}}"
if [[ $# -eq 0 ]]; then
  echo "usage: COORDINATOR_ADDRESS=host:port NUM_PROCESSES=N PROCESS_ID=i bash launch/gpu_multinode.sh python -m msfp_jax.main ..." >&2
  exit 2
fi
if [[ -z "${COORDINATOR_ADDRESS:-}" || ! "$COORDINATOR_ADDRESS" =~ ^[^:]+:[0-9]+$ ]]; then
  echo "COORDINATOR_ADDRESS must be host:port of process 0, got '${COORDINATOR_ADDRESS:-}'" >&2; exit 2
fi
if [[ ! "$NUM_PROCESSES" =~ ^[0-9]+$ || "$NUM_PROCESSES" -lt 1 ]]; then
  echo "NUM_PROCESSES must be a positive integer, got '$NUM_PROCESSES'" >&2; exit 2
fi
if [[ ! "$PROCESS_ID" =~ ^[0-9]+$ || "$PROCESS_ID" -ge "$NUM_PROCESSES" ]]; then
  echo "PROCESS_ID must be an integer in [0, $NUM_PROCESSES), got '$PROCESS_ID'" >&2; exit 2
fi
if command -v nvidia-smi >/dev/null; then
  echo "node $(hostname): process $PROCESS_ID of $NUM_PROCESSES, $(nvidia-smi -L | wc -l) GPU(s), coordinator $COORDINATOR_ADDRESS"
fi

exec "$@" --config.distributed.initialize=True \
  --config.distributed.coordinator_address="$COORDINATOR_ADDRESS" \
  --config.distributed.num_processes="$NUM_PROCESSES" \
  --config.distributed.process_id="$PROCESS_ID"
