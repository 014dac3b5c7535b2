#!/usr/bin/env bash
# One device call of H200 measurements for issues 4, 5 and 7, logs and traces under $OUT,
# a short summary printed last. Each SWEEP below fits the device tool's 10-minute call;
# the default one (train steps) takes ~7.5 min on nvidia-h200 or nvidia-h200-x2.
#
#   bash benchmarks/h200_sweep.sh                  # OUT defaults to /tmp/h200_sweep
#
# Through the device tool (no package registry there; carry the ml_collections wheel):
#   python3 -m pip install -q --no-index --no-deps --target .site .whl/*.whl &&
#   export PYTHONPATH=$PWD/.site:$PWD && bash benchmarks/h200_sweep.sh
#
# 1. train_step.py (~117M active, bf16, batch 32 x 1024): the default (cuDNN attention
#    through attention_impl="auto") with a profiler trace, an all-dense baseline of the
#    same width (--every 1000: no MoE block), batch 64, and (with 2 GPUs) the capacity
#    strategy (batched cuBLAS einsums instead of the grouped Pallas kernels).
#    ~7.5 minutes (each MoE step compiles in ~68 s). The GPU correctness checks are their
#    own call now (SWEEP=tests: they no longer fit beside the train steps).
#
#   SWEEP=ep bash benchmarks/h200_sweep.sh        # with 2+ GPUs: ep_scaling.py at 1 and 2
#     GPUs (dropless, with a trace; the 2-GPU row with its loss check needs ~4 minutes). A
#     capacity-bounded exchange is a separate call: ep_scaling.py --devices 2
#     --ep_capacity_factor 1.25 --baseline <1-GPU tokens/s/dev>
#
#   SWEEP=moe bash benchmarks/h200_sweep.sh       # issue 4 instead (<10 min): the MoE layer
#     table of the issue's three shapes (the default impl="auto", all-Pallas, all-Mosaic-GPU
#     and the fused-input-projection experiment for comparison), the mgpu GPU tests, and
#     the gather-only row moves against scatter-add gradients (block_moves.py)
#   SWEEP=rows bash benchmarks/h200_sweep.sh      # the row-move kernels against XLA's
#     gathers at the three shapes (row_moves.py, ~2 min; its --sweep of their tilings takes
#     ~2 min per move and shape, as its own call: --moves "to_blocks,combine grad" sweeps
#     the scatter kernel's two)
#   SWEEP=moeprof bash benchmarks/h200_sweep.sh   # where the dropless layer's time goes
#     (~3 min): traces of dense and dropless fwd+bwd at the three shapes, tabled by op
#   SWEEP=tiles bash benchmarks/h200_sweep.sh     # the grouped-matmul kernel tile sweep
#     (gmm_tiles.py, ~4 min): where impl="auto"'s choices and the kernels' tiles come from
#   SWEEP=block bash benchmarks/h200_sweep.sh     # modjax's block kernels (~6 min): their
#     GPU tests, the weight-gradient kernel's sweep against jax's at the three shapes, and
#     the block gmm's profile
#   SWEEP=tests PART=1 bash benchmarks/h200_sweep.sh   # the GPU tests (bf16 tolerances),
#     with per-test durations, in two calls of up to 9 minutes: PART=1 the kernels
#     (tests/kernels), PART=2 the layers, computations and the cuDNN attention check (the
#     ninth session's 72 of them took ~320 s after compiles)
#   SWEEP=ab METHODS=dropless,dropless+sort bash benchmarks/h200_sweep.sh   # an A/B of
#     layer variants (moe_layer.py's VARIANTS) interleaved in one process at the three
#     shapes (moe_interleaved.py, ~4 min; sequential timings drift by a few percent);
#     METHODS=dropless,dropless+coop times the ping-pong default of short contractions
#     against the chained cooperative pipelines it replaced, and
#     METHODS=dropless,dropless+unfused the SwiGLU kernels against two gmm and XLA's
#     activation (dropless+bwdall, +bwdnone, +nosum: the backward's kernels one by one);
#     METHODS=dropless,dropless+nocib the FFN and the combine as one op (OLMoE) or two;
#     +scatter1 and +gathers: the row kernels' tiling and the gather kernel
#   SWEEP=cluster bash benchmarks/h200_sweep.sh   # the block gmm in 2-CTA clusters (x tiles
#     multicast; ~7 min): its GPU tests, its sweep against the default tilings, and the
#     layer with it (dropless+cluster) beside the default and the dense FFN
set -u
OUT=${OUT:-/tmp/h200_sweep}
mkdir -p "$OUT"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false"
export NCCL_NVLS_ENABLE=0
unset JAX_PLATFORMS  # host_init (the GPU default) needs the CPU backend beside CUDA
# a profile with CUDA command buffers off: with them on, the trace names the graphs, not
# the kernels in them (the timings of that run say so: they are taken before the trace)
NOCB="$XLA_FLAGS --xla_gpu_enable_command_buffer="
NGPU=$(nvidia-smi -L | wc -l)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)"
  date -u; } > "$OUT/env.txt" 2>&1

if [[ "${SWEEP:-train}" == tiles ]]; then
  timeout 540 python3 benchmarks/gmm_tiles.py --shapes olmoe,mixtral,small --budget 480 \
    --out "$OUT/gmm_tiles.jsonl" > "$OUT/gmm_tiles.log" 2>&1
  cat "$OUT/env.txt"; sed -n '/^device/,$p' "$OUT/gmm_tiles.log"
  exit 0
fi
if [[ "${SWEEP:-train}" == rows ]]; then
  timeout 300 python3 benchmarks/row_moves.py --iters 30 > "$OUT/row_moves.log" 2>&1
  cat "$OUT/env.txt"; cat "$OUT/row_moves.log"
  exit 0
fi
if [[ "${SWEEP:-train}" == moeprof ]]; then
  XLA_FLAGS="$NOCB" timeout 400 python3 benchmarks/moe_layer.py --preset gpu --iters 10 \
    --methods dense,dropless --profile "$OUT/prof" > "$OUT/moe_prof.log" 2>&1
  for d in "$OUT"/prof/*/; do  # the tables come back; the nested trace directories do not
    python3 benchmarks/trace_summary.py "$d" --steps 3 --top 25 > "$OUT/trace_$(basename "$d").md" 2>&1
  done
  cat "$OUT/env.txt"; grep -E "^###|^\| (dense|dropless)" "$OUT/moe_prof.log"
  for f in "$OUT"/trace_*-dropless.md; do echo "== $f"; sed -n '/| kind/,/^$/p' "$f"; done
  exit 0
fi
if [[ "${SWEEP:-train}" == moe ]]; then
  timeout 60 python3 benchmarks/block_moves.py --dtype bfloat16 \
    --shapes "8192,512,16,2;16384,2048,64,8;16384,4096,8,2" > "$OUT/block_moves.log" 2>&1
  timeout 400 python3 benchmarks/moe_layer.py --preset gpu --iters 10 --out "$OUT/moe_layer.md" \
    --methods dense,einsum,capacity,ragged_dot,dropless,dropless:pallas,dropless:mgpu,dropless+fused \
    > "$OUT/moe_layer.log" 2>&1
  MODJAX_GPU_TESTS=1 JAX_PLATFORMS=cuda timeout 90 python3 -m pytest -q -p no:cacheprovider \
    tests/kernels/test_mgpu_gmm.py > "$OUT/mgpu_tests.log" 2>&1
  cat "$OUT/env.txt"; grep -E "^###|^\| (dense|dropless|einsum|capacity|ragged)" "$OUT/moe_layer.log"
  tail -1 "$OUT/mgpu_tests.log"
  cat "$OUT/block_moves.log"
  exit 0
fi

if [[ "${SWEEP:-train}" == block ]]; then
  MODJAX_GPU_TESTS=1 JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider \
    tests/kernels/test_mgpu_block_gmm.py > "$OUT/block_tests.log" 2>&1
  timeout 240 python3 benchmarks/gmm_tiles.py --shapes olmoe,mixtral,small --budget 220 \
    --impls mgpu,block --kinds tg_up,tg_down --out "$OUT/gmm_tgmm.jsonl" > "$OUT/gmm_tgmm.log" 2>&1
  timeout 100 python3 benchmarks/block_gmm_profile.py --out /tmp/block_profile \
    > "$OUT/block_profile.log" 2>&1
  cat "$OUT/env.txt"; tail -1 "$OUT/block_tests.log"; grep -E "^FAILED" "$OUT/block_tests.log"
  sed -n '/^device/,$p' "$OUT/gmm_tgmm.log"; grep -c error "$OUT/gmm_tgmm.log"
  tail -8 "$OUT/block_profile.log"
  exit 0
fi

if [[ "${SWEEP:-train}" == ep ]]; then
  XLA_FLAGS="$NOCB" timeout 540 python3 benchmarks/ep_scaling.py --devices 1,2 \
    --profile "$OUT/prof_ep" --out "$OUT/ep_dropless.json" > "$OUT/ep_dropless.log" 2>&1
  cat "$OUT/env.txt"; grep "^|" "$OUT/ep_dropless.log"
  [[ -d "$OUT/prof_ep" ]] && python3 benchmarks/trace_summary.py "$OUT/prof_ep" --steps 3 \
    --top 25 > "$OUT/trace_ep.md" 2>&1 && head -22 "$OUT/trace_ep.md"
  find "$OUT" -name "*.xplane.pb" -delete
  exit 0
fi
if [[ "${SWEEP:-train}" == tests ]]; then
  MODJAX_GPU_TESTS=1 JAX_PLATFORMS=cuda timeout 540 python3 -m pytest -q -p no:cacheprovider \
    -rf --durations 15 $(if [[ "${PART:-1}" == 1 ]]; then echo tests/kernels; else
      echo tests/layers/test_moe.py tests/computation \
      "tests/models/test_models.py::test_attention_auto_is_cudnn_on_gpu_and_matches_xla_bf16"
    fi) > "$OUT/gpu_tests.log" 2>&1
  cat "$OUT/env.txt"; grep -E "^FAILED|passed|failed" "$OUT/gpu_tests.log" | tail -20
  exit 0
fi
if [[ "${SWEEP:-train}" == ab ]]; then
  timeout 540 python3 benchmarks/moe_interleaved.py --shapes small,olmoe,mixtral \
    --methods "${METHODS:-dropless,dropless+unfused}" --rounds 6 --iters 5 > "$OUT/ab.log" 2>&1
  cat "$OUT/env.txt"; grep -v "^$" "$OUT/ab.log"
  exit 0
fi
if [[ "${SWEEP:-train}" == cluster ]]; then
  MODJAX_GPU_TESTS=1 JAX_PLATFORMS=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider \
    tests/kernels/test_mgpu_block_gmm.py -k "cluster" > "$OUT/cluster_tests.log" 2>&1
  cat "$OUT/env.txt"; tail -1 "$OUT/cluster_tests.log"; grep -E "^FAILED" "$OUT/cluster_tests.log"
  # a failed launch poisons the process: time nothing after one
  tail -1 "$OUT/cluster_tests.log" | grep -qE "failed|error" && exit 1
  timeout 180 python3 benchmarks/gmm_tiles.py --shapes olmoe,mixtral,small --budget 160 \
    --impls block --kinds up,down,down_t --where cluster=2 --out "$OUT/gmm_cluster.jsonl" \
    > "$OUT/gmm_cluster.log" 2>&1
  grep -v '^{' "$OUT/gmm_cluster.log" | tail -12
  grep '"impl": "block"' "$OUT/gmm_cluster.jsonl" | grep -o '"shape.*' | cut -c1-200
  timeout 200 python3 benchmarks/moe_layer.py --preset gpu --iters 10 \
    --methods dense,dropless,dropless+cluster > "$OUT/moe_cluster.log" 2>&1
  grep -E "^###|^\| (dense|dropless)" "$OUT/moe_cluster.log"
  exit 0
fi

ts() {  # ts GPU TIMEOUT ARGS...
  local gpu=$1 limit=$2
  shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 benchmarks/train_step.py --steps 20 \
    --watchdog $((limit - 5)) --out "$OUT/train_step.jsonl" ${TS_EXTRA:-} "$@"
}
(
  # the MoE step compiles in ~68 s since the block kernel runs at every width (was 49 s)
  ts 0 110 > "$OUT/ts_default.log" 2>&1
  XLA_FLAGS="$NOCB" ts 0 120 --steps 10 --profile "$OUT/prof_train_step" > "$OUT/ts_prof.log" 2>&1
  ts 0 80 --every 1000 > "$OUT/ts_dense.log" 2>&1
  ts 0 120 --batch 64 > "$OUT/ts_b64.log" 2>&1
) &
if [[ $NGPU -ge 2 ]]; then
  ts 1 80 --strategy capacity > "$OUT/ts_capacity.log" 2>&1 &
fi
wait

echo "== environment"; cat "$OUT/env.txt"
echo "== errors"; grep -l -E "Error|Traceback" "$OUT"/*.log 2>/dev/null
[[ -d "$OUT/prof_train_step" ]] && python3 benchmarks/trace_summary.py "$OUT/prof_train_step" \
  --steps 3 --top 25 > "$OUT/trace_train_step.md" 2>&1 && head -22 "$OUT/trace_train_step.md"
find "$OUT" -name "*.xplane.pb" -delete  # the .trace.json.gz stays (smaller)
echo "== train_step"
python3 - "$OUT/train_step.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    c = r["config"]
    print(f"every={c['every']} batch={r['batch']} strategy={c['strategy']} "
          f"attention={c['attention_impl']}: "
          f"{r['step_ms']:.1f} ms/step, {r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']:.1%}, "
          f"compile {r['compile_s']:.0f} s, loss {r['final_loss']:.3f}")
EOF
