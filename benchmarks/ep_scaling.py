"""Weak scaling of the MoE LM train step with expert parallelism (issue 7).

For each device count n (default 1, 2, 4, 8, up to ``jax.device_count()``) builds the
MoE Transformer LM of ``benchmarks/train_step.py`` with ``experts_per_device * n_expert``
experts and ``batch_per_device * n`` sequences per step, on the mesh ``(data, expert=n /
data)`` over the first n devices (``--data 1``: pure expert parallelism), and reports

* step time: median of ``--steps`` jitted trainer steps (``modjax.train.step``), each
  blocked on, after ``--warmup`` steps (and after the loss-check steps, which share the
  compiled step when the loss check uses the timing batch);
* tokens/s per device and MFU against ``--peak_tflops`` (785 bf16 TFLOP/s per H200),
  with the active FLOPs of ``benchmarks.train_step.active_flops_per_token``;
* weak-scaling efficiency = (tokens/s per device at n) / (tokens/s per device at the
  smallest n run, normally 1: the local dropless path, no all-to-all);
* all-to-all share: the all-to-all ops of the compiled step (read off its HLO: count,
  dtype, per-device size) replayed alone, back to back, on the same mesh, divided by
  the step time. That is the time the exchanges cost when nothing overlaps them (an
  upper bound on their exposed time in the step; XLA may overlap some with compute);
* loss check: ``--loss_steps`` (20) steps of the same global problem (same model, init,
  and batches: ``experts_per_device * n_expert`` experts, ``check_batch_per_device * n``
  sequences) on n devices and on one device; max |loss_n - loss_1| must stay below
  ``rtol * |loss_1|`` (rtol 2^-7 = 2 bf16 ulps in bfloat16, 1e-4 in float32).

NVLink multicast stays off: the script sets ``NCCL_NVLS_ENABLE=0`` (if unset) before
jax starts, so NCCL never uses NVLS on GPU hosts (no effect on CPU).

Usage (one call on a multi-GPU kind; bf16, ~100M active params at n=1)::

  PYTHONPATH=. python benchmarks/ep_scaling.py --out /tmp/ep_scaling.json
  # CPU mechanics only (simulated devices share the host's cores: no speed meaning):
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \\
    PYTHONPATH=. python benchmarks/ep_scaling.py --tiny --dtype float32

The markdown table is printed last; ``--out`` also writes all rows as JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off, before jax starts

import argparse
import json
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # run as a script: import modjax and benchmarks.* from the repo
    sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.expert_parallel import hlo_all_to_alls, nbytes  # noqa: E402
from benchmarks.train_step import FULL, TINY, active_flops_per_token  # noqa: E402
from modjax.models import TransformerConfig, TransformerLM  # noqa: E402
from modjax.sharding import make_mesh  # noqa: E402
from modjax.train.loop import global_batch  # noqa: E402
from modjax.train.optim import OptimizerConfig, make_optimizer, param_labels  # noqa: E402
from modjax.train.step import TaskConfig, init_train_state, make_train_step  # noqa: E402

# Per-device sizes: FULL/TINY of train_step.py give the model; these the weak-scaled part.
PER_DEVICE = {"full": dict(experts=8, batch=32, check_batch=2), "tiny": dict(experts=2, batch=2,
              check_batch=2)}  # fmt: skip
LOSS_RTOL = {"bfloat16": 2.0**-7, "float32": 1e-4}


def _model_config(size: dict, experts: int, args) -> TransformerConfig:
    return TransformerConfig(
        vocab_size=size["vocab"], d_model=size["d_model"], num_layers=size["layers"],
        num_heads=size["heads"], d_ff=size["d_ff"], ffn="moe", sparse_placement="every",
        sparse_every=args.every,
        sparse_kwargs=dict(num_experts=experts, k=size["k"], strategy="dropless",
                           ep_capacity_factor=args.ep_capacity_factor),
        dtype=args.dtype, param_dtype="float32",
    )  # fmt: skip


def _mesh(n: int, data: int):
    data = min(data, n)
    if n % data:
        raise ValueError(f"--data={data} does not divide the device count {n}")
    return make_mesh(data=data, expert=n // data, devices=jax.devices()[:n])


def _trainer(cfg: TransformerConfig, mesh):
    """``(state, jitted step)`` of the project trainer for ``cfg`` on ``mesh``."""
    opt = OptimizerConfig(learning_rate=1e-3, warmup_steps=5)
    holder = {}

    def tx_fn(params):
        holder["labels"] = param_labels(params, opt)
        return make_optimizer(opt, holder["labels"])

    graphdef, state, tx, shardings = init_train_state(
        lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)), tx_fn, mesh
    )
    task = TaskConfig(name="lm", target_key="", aux_loss_weights={"load_balancing": 0.01,
                                                                   "z_loss": 0.001})  # fmt: skip
    fn = make_train_step(graphdef, tx, task, labels=holder["labels"], bias_mask={})
    return state, jax.jit(fn, donate_argnums=0, out_shardings=(shardings, None))


def _batches(num: int, batch: int, seq: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        {"inputs": rng.integers(0, vocab, (batch, seq + 1), dtype=np.int32)} for _ in range(num)
    ]


def _run_losses(state, step, mesh, batches) -> tuple[object, list[float]]:
    losses = []
    with jax.set_mesh(mesh):
        for b in batches:
            state, m = step(state, global_batch(b, mesh))
            losses.append(float(m["loss"]))
    return state, losses


def _time_steps(state, step, mesh, batch, warmup: int, steps: int):
    times = []
    with jax.set_mesh(mesh):
        batch = global_batch(batch, mesh)
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready((state.params, m["loss"]))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return state, statistics.median(times)


def time_all_to_alls(ops: list[tuple[str, int]], mesh, repeats: int) -> float:
    """Median seconds of the all-to-alls ``ops`` run back to back (tiled, over the
    ``expert`` axis), each on a buffer of its per-device size, rounded up to ep rows."""
    if not ops or mesh.shape["expert"] == 1:
        return 0.0
    ep = mesh.shape["expert"]
    axes = tuple(a for a in ("data", "expert") if mesh.shape[a] > 1)
    spec = jax.P(axes, None)
    dt = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "s32": "int32", "u32": "uint32"}
    bufs = [
        jax.device_put(
            np.zeros((mesh.size * ep, -(-n // ep)), dt.get(d, "float32")),
            jax.NamedSharding(mesh, spec),
        )
        for d, n in ops
    ]

    def body(*xs):
        # A data dependence chains the ops so XLA runs them one after another.
        outs, carry = [], None
        for x in xs:
            x = x if carry is None else x + carry.astype(x.dtype)
            y = jax.lax.all_to_all(x, "expert", 0, 0, tiled=True)
            carry = y[0, 0] * 0
            outs.append(y)
        return tuple(outs)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * len(bufs),
                              out_specs=(spec,) * len(bufs)))  # fmt: skip
    jax.block_until_ready(f(*bufs))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*bufs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(n: int, args, size: dict, per: dict, profile: bool = False) -> dict:
    """One row of the table: n devices, weak-scaled problem."""
    mesh = _mesh(n, args.data)
    ep = mesh.shape["expert"]
    experts = per["experts"] * ep
    cfg = _model_config(size, experts, args)
    seq, vocab = size["seq"], size["vocab"]
    batch = per["batch"] * n
    check_batch = per["check_batch"] * n
    row = {"devices": n, "mesh": {k: v for k, v in mesh.shape.items() if v > 1} or {"": 1},
           "experts": experts, "batch": batch, "tokens_per_step": batch * seq}  # fmt: skip

    t0 = time.perf_counter()
    state, step = _trainer(cfg, mesh)
    timing_batch = _batches(1, batch, seq, vocab, seed=1000 + n)[0]
    with jax.set_mesh(mesh):  # compiled once, ahead of time: the HLO and the timed step
        step = step.lower(state, global_batch(timing_batch, mesh)).compile()
    hlo = step.as_text()
    check = _batches(args.loss_steps, check_batch, seq, vocab, seed=n)
    losses_n = None
    if check_batch == batch:  # the loss-check steps share the compiled step, and warm it
        state, losses_n = _run_losses(state, step, mesh, check)
    state, step_s = _time_steps(state, step, mesh, timing_batch, args.warmup, args.steps)
    if profile:  # a trace of 3 more steps (benchmarks/trace_summary.py reads it)
        jax.profiler.start_trace(args.profile)
        state, _ = _time_steps(state, step, mesh, timing_batch, 0, 3)
        jax.profiler.stop_trace()
    del state
    ops = hlo_all_to_alls(hlo)
    a2a_s = time_all_to_alls(ops, mesh, args.steps)

    abstract = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
    active, total, flops_param, attn = active_flops_per_token(abstract)
    flops_step = batch * seq * (flops_param + attn * seq)
    row.update(
        active_params=active, total_params=total, step_ms=step_s * 1e3,
        tokens_per_s_per_device=batch * seq / step_s / n,
        mfu=flops_step / step_s / (args.peak_tflops * 1e12 * n),
        all_to_alls=len(ops),
        a2a_mib_per_device=sum(nbytes(d, e) for d, e in ops) / 2**20,
        a2a_ms=a2a_s * 1e3, a2a_share=a2a_s / step_s,
    )  # fmt: skip

    if n > 1 and args.loss_steps:
        if losses_n is None:
            _, losses_n = _run_losses(*_trainer(cfg, mesh), mesh, check)
        one = _mesh(1, 1)
        _, losses_1 = _run_losses(*_trainer(cfg, one), one, check)
        diff = float(np.max(np.abs(np.asarray(losses_n) - np.asarray(losses_1))))
        tol = args.loss_rtol * float(np.max(np.abs(losses_1)))
        row.update(loss_max_abs_diff=diff, loss_tol=tol, loss_ok=bool(diff <= tol),
                   loss_first=losses_1[0], loss_last=losses_1[-1],
                   check_tokens=check_batch * seq)  # fmt: skip
    row["wall_s"] = time.perf_counter() - t0
    return row


def markdown_table(rows: list[dict]) -> str:
    head = ("| GPUs | mesh | experts | tokens/step | step ms | tokens/s/dev | MFU | weak eff. "
            "| all-to-all MiB/dev | all-to-all share | loss max abs diff (tol) |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if k) or "1"
        loss = "(reference)" if r["devices"] == 1 else "-"
        if "loss_ok" in r:
            verdict = "ok" if r["loss_ok"] else "FAIL"
            loss = f"{r['loss_max_abs_diff']:.2e} ({r['loss_tol']:.1e}) {verdict}"
        lines.append(
            f"| {r['devices']} | {mesh} | {r['experts']} | {r['tokens_per_step']} "
            f"| {r['step_ms']:.1f} | {r['tokens_per_s_per_device']:.0f} | {r['mfu']:.1%} "
            f"| {r['efficiency']:.1%} | {r['a2a_mib_per_device']:.2f} ({r['all_to_alls']} ops) "
            f"| {r['a2a_share']:.1%} | {loss} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="a CPU-sized model and batch")
    p.add_argument("--devices", default="1,2,4,8", help="device counts (those <= available)")
    p.add_argument("--data", type=int, default=1, help="data axis size (experts on the rest)")
    for k, v in PER_DEVICE["full"].items():
        p.add_argument(f"--{k}_per_device", type=int, default=None,
                       help=f"default {v} ({PER_DEVICE['tiny'][k]} tiny)")  # fmt: skip
    for k in ("seq", "d_model", "layers", "k"):
        p.add_argument(f"--{k}", type=int, default=None, help=f"default {FULL[k]}")
    p.add_argument("--every", type=int, default=2, help="every n-th block is MoE")
    p.add_argument("--dtype", default=None, help="bfloat16 (default) or float32 (tiny default)")
    p.add_argument(
        "--ep_capacity_factor",
        type=float,
        default=None,
        help="all-to-all buffer per destination, in multiples of the balanced "
        "share (default: dropless worst case; overflow is counted)",
    )
    p.add_argument(
        "--profile",
        default="",
        help="write a profiler trace of 3 steps at the "
        "largest device count here (read it with benchmarks/trace_summary.py)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loss_steps", type=int, default=20)
    p.add_argument("--loss_rtol", type=float, default=None, help="2^-7 bf16, 1e-4 float32")
    p.add_argument("--peak_tflops", type=float, default=785.0, help="per device, bf16")
    p.add_argument("--baseline", type=float, default=None,
                   help="tokens/s per device at 1 device from an earlier call (weak-scaling "
                        "efficiency base; default: the first count run now)")  # fmt: skip
    p.add_argument("--out", default="", help="write the rows here as JSON (after each count)")
    args = p.parse_args(argv)
    # experts and batch of FULL/TINY are the 1-device sizes: here they scale with n.
    size = {k: v for k, v in (TINY if args.tiny else FULL).items() if k not in PER_DEVICE["full"]}
    size.update({k: getattr(args, k) for k in ("seq", "d_model", "layers", "k")
                 if getattr(args, k) is not None})  # fmt: skip
    per = dict(PER_DEVICE["tiny" if args.tiny else "full"])
    per.update({k: getattr(args, f"{k}_per_device") for k in per
                if getattr(args, f"{k}_per_device") is not None})  # fmt: skip
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    if args.loss_rtol is None:
        if args.dtype not in LOSS_RTOL:
            raise ValueError(f"--dtype must be one of {sorted(LOSS_RTOL)}, got {args.dtype!r}")
        args.loss_rtol = LOSS_RTOL[args.dtype]
    counts = [int(c) for c in args.devices.split(",") if int(c) <= jax.device_count()]
    if not counts:
        raise ValueError(f"--devices={args.devices!r}: none <= {jax.device_count()} devices")

    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"dtype {args.dtype}, per device: {per}, model: {size}, "
          f"NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}", flush=True)  # fmt: skip
    rows = []
    meta = {"device": jax.devices()[0].device_kind, "dtype": args.dtype, "per_device": per,
            "model": size, "loss_rtol": args.loss_rtol}  # fmt: skip
    for n in counts:
        rows.append(measure(n, args, size, per, profile=bool(args.profile) and n == max(counts)))
        base = args.baseline or rows[0]["tokens_per_s_per_device"]
        for r in rows:
            r["efficiency"] = r["tokens_per_s_per_device"] / base
        print(json.dumps(rows[-1]), flush=True)
        if args.out:  # after each count: a run cut short still leaves its rows
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if jax.devices()[0].platform == "cpu":
        print("(simulated CPU devices share the host's cores: times are mechanics, not speed)")
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    rows = main()
    sys.exit(0 if all(r.get("loss_ok", True) for r in rows) else 1)
