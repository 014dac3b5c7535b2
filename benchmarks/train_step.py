"""Train-step throughput and MFU of a MoE Transformer LM (~100M active parameters).

Runs the trainer's own jitted step (``modjax.train.step``: sharded params, donated
state, partitioned AdamW, aux losses) on random tokens and reports tokens/s and model
FLOPs utilisation::

  MFU = active FLOPs per step / step time / (peak FLOP/s per device * devices)

Active FLOPs per token = 6 * (active matmul parameters: attention, dense FFNs, k of E
experts, routers, the output projection; not the embedding lookup) + 12 * L * T * D for
attention scores (forward + backward, causal positions counted in full, as in the PaLM
paper's MFU). Peak defaults to 785 TFLOP/s bf16 per H200 (``--peak_tflops``).

  python benchmarks/train_step.py                        # ~100M active, bf16, GPU
  python benchmarks/train_step.py --tiny                 # seconds on CPU
  python benchmarks/train_step.py --expert 8 --data 1    # expert parallel on 8 GPUs
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from modjax.models import TransformerConfig, TransformerLM
from modjax.sharding import make_mesh
from modjax.train.loop import global_batch
from modjax.train.optim import OptimizerConfig, make_optimizer, param_labels
from modjax.train.step import TaskConfig, init_train_state, make_train_step

TINY = dict(vocab=256, d_model=32, layers=2, heads=2, d_ff=64, experts=4, k=2, batch=4, seq=32)
FULL = dict(
    vocab=32_768, d_model=768, layers=12, heads=12, d_ff=1536, experts=8, k=2, batch=32,
    seq=1024,
)  # fmt: skip


def active_flops_per_token(model: TransformerLM) -> tuple[int, int, float, int]:
    """``(active matmul params, total params, parameter FLOPs per token, attention
    FLOPs per token per context position)`` of a training step."""
    cfg = model.config
    active = total = 0
    for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = int(np.prod(v.get_value().shape))
        total += n
        names = [str(p) for p in path]
        if "embed" in names and not cfg.tie_embeddings:
            continue  # a lookup, no matmul
        if v.get_value().ndim < 2:
            continue  # norms
        axes = getattr(v, "logical_axes", None) or ()
        if axes and axes[0] == "expert":
            e = v.get_value().shape[0]
            n = n * cfg.sparse_kwargs.get("k", 1) // e
        active += n
    attention = 12 * cfg.num_layers * cfg.d_model  # per token per position of context
    return active, total, float(6 * active), attention


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a CPU-sized model and batch")
    for k, v in FULL.items():
        p.add_argument(f"--{k}", type=int, default=None, help=f"default {v} ({TINY[k]} tiny)")
    p.add_argument("--dtype", default=None, help="compute dtype (bfloat16; float32 tiny)")
    p.add_argument("--strategy", default="dropless", help="MoE dispatch strategy")
    p.add_argument("--impl", default="auto", help="grouped-matmul impl (auto, pallas, mgpu, xla)")
    p.add_argument("--every", type=int, default=2, help="every n-th block is MoE")
    p.add_argument("--attention_impl", default="auto", help="auto, xla or cudnn")
    p.add_argument("--remat", default="none", help="activation checkpointing: none, dots, full")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--data", type=int, default=-1)
    p.add_argument("--fsdp", type=int, default=1)
    p.add_argument("--expert", type=int, default=1)
    p.add_argument("--tensor", type=int, default=1)
    p.add_argument("--peak_tflops", type=float, default=785.0, help="per device, bf16")
    p.add_argument("--out", default="", help="append the result as a JSON line here")
    p.add_argument("--profile", default="", help="write a profiler trace of 3 steps here")
    p.add_argument("--hlo", default="", help="write the compiled step's optimized HLO here")
    p.add_argument(
        "--watchdog",
        type=float,
        default=0,
        help="dump every thread's Python stack after this many seconds (0: off)",
    )
    args = p.parse_args(argv)
    if args.watchdog > 0:  # a run that overstays its budget says where it is
        faulthandler.dump_traceback_later(args.watchdog, exit=False)
    t_start = time.perf_counter()
    log = lambda what: print(f"[train_step {time.perf_counter() - t_start:7.1f}s] {what}",
                             file=sys.stderr, flush=True)  # fmt: skip
    defaults = TINY if args.tiny else FULL
    size = {k: defaults[k] if getattr(args, k) is None else getattr(args, k) for k in FULL}
    dtype = args.dtype or ("float32" if args.tiny else "bfloat16")

    cfg = TransformerConfig(
        vocab_size=size["vocab"], d_model=size["d_model"], num_layers=size["layers"],
        num_heads=size["heads"], d_ff=size["d_ff"], ffn="moe", sparse_placement="every",
        sparse_every=args.every,
        sparse_kwargs=dict(num_experts=size["experts"], k=size["k"], strategy=args.strategy,
                           impl=args.impl),
        attention_impl=args.attention_impl, remat=args.remat, dtype=dtype,
        param_dtype="float32",
    )  # fmt: skip
    mesh = make_mesh(data=args.data, fsdp=args.fsdp, expert=args.expert, tensor=args.tensor)
    opt = OptimizerConfig(learning_rate=1e-4, warmup_steps=10)
    holder = {}

    def tx_fn(params):
        holder["labels"] = param_labels(params, opt)
        return make_optimizer(opt, holder["labels"])

    model_fn = lambda: TransformerLM(cfg, rngs=nnx.Rngs(0))
    log(f"devices {jax.devices()}; initialising")
    graphdef, state, tx, shardings = init_train_state(model_fn, tx_fn, mesh)
    log("initialised; compiling the step")
    has_moe = args.every <= size["layers"]  # --every above --layers: an all-dense baseline
    weights = {"load_balancing": 0.01, "z_loss": 0.001} if has_moe else {}
    task = TaskConfig(name="lm", target_key="", aux_loss_weights=weights)
    step_fn = make_train_step(graphdef, tx, task, labels=holder["labels"], bias_mask={})
    step = jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, None))

    rng = np.random.default_rng(0)
    b, t = size["batch"], size["seq"]
    batch_np = {"inputs": rng.integers(0, size["vocab"], (b, t + 1), dtype=np.int32)}
    with jax.set_mesh(mesh):
        batch = global_batch(batch_np, mesh)
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        if args.hlo:  # fusion names in a --profile trace are the names in this text
            with open(args.hlo, "w") as f:
                f.write(compiled.as_text())
        log(f"compiled in {compile_s:.1f}s; first step")
        state, m = compiled(state, batch)
        jax.block_until_ready(m["loss"])
        log(f"first step done, loss {float(m['loss']):.4f}; timing {args.steps} steps")
        step = compiled
        for _ in range(args.warmup):
            state, m = step(state, batch)
        jax.block_until_ready(state.params)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, batch)
        jax.block_until_ready(state.params)
        step_s = (time.perf_counter() - t0) / args.steps
        if args.profile:  # a trace of 3 steps, for TensorBoard's or xprof's profile viewer
            jax.profiler.start_trace(args.profile)
            for _ in range(3):
                state, m = step(state, batch)
            jax.block_until_ready(state.params)
            jax.profiler.stop_trace()
    faulthandler.cancel_dump_traceback_later()
    log(f"{step_s * 1e3:.1f} ms/step")

    abstract = nnx.eval_shape(model_fn)
    active, total, flops_param, attn = active_flops_per_token(abstract)
    tokens = b * t
    flops_step = tokens * (flops_param + attn * t)
    n_dev = mesh.devices.size
    result = {
        "device": jax.devices()[0].device_kind,
        "devices": n_dev,
        "mesh": dict(mesh.shape),
        "dtype": dtype,
        "batch": b,
        "seq_len": t,
        "active_params": active,
        "total_params": total,
        "tokens_per_s": tokens / step_s,
        "step_ms": step_s * 1e3,
        "compile_s": compile_s,
        "tflops_per_s_per_device": flops_step / step_s / n_dev / 1e12,
        "mfu": flops_step / step_s / (args.peak_tflops * 1e12 * n_dev),
        "final_loss": float(m["loss"]),
        "config": {
            **size,
            "strategy": args.strategy,
            "impl": args.impl,
            "every": args.every,
            "attention_impl": args.attention_impl,
            "remat": args.remat,
        },
    }
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    if not np.isfinite(result["final_loss"]):
        print("non-finite loss", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
