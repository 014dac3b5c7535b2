#!/usr/bin/env bash
# Multi-host TPU VM slice: run the trainer on every worker at once. Each worker sees
# TPU_WORKER_HOSTNAMES (more than one host) and the trainer calls
# jax.distributed.initialize(), which discovers the slice by itself.
#   bash launch/tpu_vm.sh TPU_NAME ZONE experiments/moe_char_lm.py gs://bucket/moe \
#       [--config.KEY=VALUE ...]
# The repository must already be at ~/modjax on every worker (with .venv installed);
# the workdir must be shared storage (e.g. a gs:// bucket) for checkpoints.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG[:ARG] WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
extra=""
if (( $# )); then extra=$(printf ' %q' "$@"); fi
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/modjax && .venv/bin/python -m modjax.train --config $(printf %q "$config") \
--workdir $(printf %q "$workdir")$extra"
