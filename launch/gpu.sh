#!/usr/bin/env bash
# Train one experiment on the GPUs of one host, with the XLA flags a GPU run wants.
#   bash launch/gpu.sh experiments/moe_char_lm.py workdir/moe_char_lm [--config.KEY=VALUE ...]
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 CONFIG[:ARG] WORKDIR [--config.KEY=VALUE ...]" >&2
  exit 2
fi
# Latency-hiding scheduling overlaps collectives with compute; Triton GEMM fusion off
# keeps cuBLAS for the big matmuls; the memory fraction leaves room for NCCL buffers.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_enable_triton_gemm=false \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
--xla_gpu_all_gather_combine_threshold_bytes=134217728 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
# A persistent compilation cache in the user's own cache directory (it is trusted code:
# never point it at a directory others can write): a resumed or repeated run skips the
# step's compile (35 s for the MoE train-step benchmark with the Mosaic GPU kernels).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/modjax/jax}
# NVLink multicast (NVLS) stays off: not every host supports it.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
exec bash "$(dirname "$0")/local.sh" "$@"
