#!/usr/bin/env bash
# Run one msfp_jax command on every worker of a Cloud TPU VM pod (same command everywhere; JAX discovers the
# coordinator, process count and process id on TPU pods by itself).
#
# Exact command (creates the pod if it does not exist, copies this repository, installs, runs):
#   ZONE=us-central2-b TPU_NAME=msfp-pod ACCELERATOR=v4-32 \
#   bash launch/tpu_pod.sh python -m msfp_jax.main --config=configs/imagenet.py:w4a4 \
#       --workdir=gs://BUCKET/runs/imagenet_w4a4 --mode=finetune
#
# Environment: ZONE, TPU_NAME (required); ACCELERATOR (default v4-32), RUNTIME (default tpu-ubuntu2204-base),
# CREATE=0 to only ssh to an existing pod, SETUP=0 to skip copying/installing.
# The script appends --config.distributed.initialize=True so that main.py calls jax.distributed.initialize().
set -euo pipefail

: "${ZONE:?set ZONE, e.g. us-central2-b}"
: "${TPU_NAME:?set TPU_NAME, the TPU VM name}"
ACCELERATOR="${ACCELERATOR:-v4-32}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
CREATE="${CREATE:-1}"
SETUP="${SETUP:-1}"
if [[ $# -eq 0 ]]; then
  echo "usage: ZONE=... TPU_NAME=... bash launch/tpu_pod.sh python -m msfp_jax.main --config=... --workdir=..." >&2
  exit 2
fi
command -v gcloud >/dev/null || { echo "gcloud is not installed (https://cloud.google.com/sdk)" >&2; exit 1; }

if [[ "$CREATE" == "1" ]] && ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
fi

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "$SETUP" == "1" ]]; then
  tar -C "$REPO_DIR" --exclude=.venv --exclude=.cache --exclude=.git -czf /tmp/msfp_jax_src.tgz .
  gcloud compute tpus tpu-vm scp /tmp/msfp_jax_src.tgz "$TPU_NAME":~/msfp_jax_src.tgz --zone "$ZONE" --worker=all
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
    "mkdir -p ~/msfp_jax && tar -C ~/msfp_jax -xzf ~/msfp_jax_src.tgz && cd ~/msfp_jax && \
     python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
fi

# Quote every argument for the remote shell.
REMOTE_CMD=""
for arg in "$@"; do REMOTE_CMD+=" $(printf '%q' "$arg")"; done
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/msfp_jax && source .venv/bin/activate && ${REMOTE_CMD# } --config.distributed.initialize=True"
