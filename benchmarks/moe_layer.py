"""Time a SwiGLU MoE expert layer against a dense SwiGLU FFN of the same active FLOPs.

One run times, on the same shape and inputs: ``dense`` (FFN of width k*F), ``einsum``
(GShard one-hot dispatch, capacity factor 1.25 in groups of 1024 tokens), ``capacity``
(gather/scatter, same capacity and groups), ``ragged_dot`` (jax.lax.ragged_dot on the
sorted rows) and ``dropless``
(modjax's default path, ``impl="auto"``), forward and forward+backward (gradients of
inputs, expert weights and routing weights). Active FLOPs: forward ``6*T*k*D*F``,
forward+backward three times that. Also reports XLA's temporary memory of each compiled
function and a skewed routing (80% of tokens to experts 0 and 1).

Usage:
  PYTHONPATH=. python benchmarks/moe_layer.py --preset gpu     # bf16 shapes of the issue
  PYTHONPATH=. python benchmarks/moe_layer.py --preset cpu     # float32 CPU shapes
  PYTHONPATH=. python benchmarks/moe_layer.py --shape 4096,256,512,8,2 --dtype float32
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from modjax.computation import ffn as ffn_lib
from modjax.kernels import grouped_matmul as gm
from modjax.kernels import grouped_swiglu as gs
from modjax.kernels import mgpu_swiglu as ms
from modjax.routing.types import Routing

PRESETS = {
    "gpu": [
        ("small", 8192, 512, 2048, 16, 2),
        ("olmoe", 16384, 2048, 1024, 64, 8),
        ("mixtral", 16384, 4096, 14336, 8, 2),
    ],
    "cpu": [
        ("cpu-a", 2048, 256, 1024, 16, 2),
        ("cpu-b", 2048, 256, 256, 64, 8),
    ],
}
CAPACITY_FACTOR = 1.25
#: Tokens per routing group of the capacity-based methods (GShard groups): the one-hot
#: einsum costs T*E*C*D with C proportional to the group size, so it needs groups.
GROUP_SIZE = 1024


def make_routing(logits, k, capacity=None):
    """Top-k softmax routing with slots in choice-major priority (a stand-in router)."""
    t, e = logits.shape
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weight, index = jax.lax.top_k(probs, k)
    index = index.astype(jnp.int32)
    one_hot = jax.nn.one_hot(index.T.reshape(-1), e, dtype=jnp.int32)
    slot = (jnp.cumsum(one_hot, 0) - 1)[jnp.arange(t * k), index.T.reshape(-1)]
    slot = slot.reshape(k, t).T.astype(jnp.int32)
    kept = jnp.ones_like(index, bool) if capacity is None else slot < capacity
    weight = jnp.where(kept, weight, 0.0)
    return Routing(index, weight, kept, slot, probs, e, capacity)


def make_logits(key, t, e, skewed):
    logits = jax.random.normal(key, (t, e), jnp.float32)
    if skewed:
        hot = jax.random.uniform(jax.random.fold_in(key, 1), (t,)) < 0.8
        logits = logits.at[:, :2].add(jnp.where(hot, 20.0, 0.0)[:, None])
    return logits


def ragged_dot_moe(x, routing, params):
    t, k = routing.expert_index.shape
    ids = routing.expert_index.reshape(-1)
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.zeros((routing.num_experts,), jnp.int32).at[ids].add(1)
    xs = x[order // k]
    dt = x.dtype
    rd = lambda a, w: jax.lax.ragged_dot(a, w.astype(dt), sizes, preferred_element_type=jnp.float32)
    h = jax.nn.silu(rd(xs, params["wi_gate"])) * rd(xs, params["wi_up"])
    ys = rd(h.astype(dt), params["wo"]).astype(dt)
    inv = jnp.zeros_like(order).at[order].set(jnp.arange(t * k))
    y = ys[inv].reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", y, routing.weight.astype(dt)).astype(dt)


def fused_expert_ffn_blocks(x, params, layout, *, activation, block_size, impl="auto",
                            interpret=False):  # fmt: skip
    """An experiment, not the library's path: the gated activation's input projections
    as one grouped matmul on weights concatenated to ``[E, D, 2F]`` (x read once, one
    input-gradient and one weight-gradient kernel instead of two each). Measured slower
    on the 2-core CPU (2026-12-01: cpu-a fwd+bwd 334-365 ms against 289); on a GPU not yet.
    ``moe_layer.py --methods dense,dropless,dropless+fused`` times it beside the library."""
    names = ffn_lib.ACTIVATIONS[activation]
    mm = functools.partial(
        gm.gmm, layout=layout, block_size=block_size, impl=impl, interpret=interpret
    )
    h = mm(x, jnp.concatenate([params[n].astype(x.dtype) for n in names], axis=-1))
    proj = dict(zip(names, jnp.split(h, len(names), axis=-1)))
    return mm(ffn_lib._hidden(activation, proj), params["wo"].astype(x.dtype))


def _scan_searchsorted(a, v, side="left", sorter=None, *, method=None):
    """``jnp.searchsorted`` by its default binary search (a while loop of log2 steps)
    whatever method the caller asks for: the layout's block groups as they were before
    they became compare-all (``grouped_matmul.group_layout``)."""
    del method
    return _SEARCHSORTED(a, v, side=side, sorter=sorter, method="scan")


_SEARCHSORTED = jnp.searchsorted


@contextlib.contextmanager
def patched(module, **attrs):
    """Set ``module``'s attributes while jit traces under it, then restore them."""
    original = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in original.items():
            setattr(module, name, value)


def _variants():
    from modjax.kernels import mgpu_block_gmm as bg
    from modjax.kernels import mgpu_gmm
    from modjax.kernels import pallas_rows as pr

    return {
        "": contextlib.nullcontext,
        # the three grouped matmuls of expert_ffn_blocks (128-row blocks) even where auto
        # takes the fused XLA loop: the CPU path before that loop existed
        "grouped": lambda: patched(gm, runs_on_xla=lambda impl: False),
        # the fused-input-projection experiment (fused_expert_ffn_blocks)
        "fused": lambda: patched(ffn_lib, expert_ffn_blocks=fused_expert_ffn_blocks),
        # the Hopper weight-gradient kernel: modjax's (the default) or jax's
        "tblock": lambda: patched(mgpu_gmm, TGMM_KERNEL="block"),
        "tragged": lambda: patched(mgpu_gmm, TGMM_KERNEL="ragged"),
        # the block gmm's CTAs in clusters of two (which do not chain pipelines)
        "cluster": lambda: patched(bg, TILES=bg.TILES.replace(cluster=2), CHAIN_MAX_K=0),
        # the layout's block groups by a binary-search while loop (_scan_searchsorted)
        "scan": lambda: patched(jnp, searchsorted=_scan_searchsorted),
        # rows ranked in their group by a running count or by a sort (the same layout;
        # the default, "auto", counts on a GPU and sorts elsewhere)
        "count": lambda: patched(gm, LAYOUT_RANKS="count"),
        "sort": lambda: patched(gm, LAYOUT_RANKS="sort"),
        # SwiGLU's projections as two gmm and the activation as its own pass (the default
        # on a Hopper GPU: one kernel with the activation in its epilogue)
        "unfused": lambda: patched(gs, FUSE=False),
        # the fused backward (dh with the activation's backward) at every width it fits
        # (the default: up to mgpu_swiglu.SWIGLU_BWD_MAX_K), or at none
        "bwdall": lambda: patched(ms, SWIGLU_BWD_MAX_K=1 << 30),
        "bwdnone": lambda: patched(ms, SWIGLU_BWD_MAX_K=0),
        # SwiGLU's input gradient as two gmm and a sum (the default: one kernel, gmm_sum_t)
        "nosum": lambda: patched(ms, SUM_T=False),
        # short contractions in chained cooperative pipelines (the default before ping-pong)
        "coop": lambda: patched(bg, SHORT_K_SCHEDULE="cooperative"),
        # the forward/input-gradient gmm in ping-pong wherever its ring allows, at every K
        # (what default_tiles does up to CHAIN_MAX_K)
        "pingpong": lambda: patched(bg, CHAIN_MAX_K=1 << 30),
        # the row moves (the layout's input, the combine, their gradients) as XLA's
        # gathers (the default on a GPU: modjax.kernels.pallas_rows' Triton kernels)
        "xlarows": lambda: patched(gm, ROW_KERNELS=False),
        # the scatter kernel with one program per token block (the tenth session's
        # tiling; the default splits each block's row into column groups)
        "scatter1": lambda: patched(pr, SCATTER_TILES={**pr.SCATTER_TILES, "split": 1}),
        # the sums out of the layout by the gather kernel too (the default: XLA's)
        "gathers": lambda: patched(gm, GATHER_KERNELS=True),
        # the FFN and the combine as two ops, each with its own gradient (the default, where
        # F < D: one op whose backward takes the weights' gradient from the activation's)
        "nocib": lambda: patched(gs, COMBINE_IN_BWD=False),
    }


#: ``dropless+VARIANT``: what each variant traces the whole layer under (backward included)
VARIANTS = _variants()


def build(method, t, k, e, dtype):
    s = min(GROUP_SIZE, t)
    capacity = math.ceil(CAPACITY_FACTOR * s * k / e)

    def grouped(x, logits, params):
        def one(xg, lg):
            r = make_routing(lg, k, capacity)
            return ffn_lib.moe_ffn(xg, r, params, strategy=method)

        y = jax.vmap(one)(x.reshape(t // s, s, -1), logits.reshape(t // s, s, -1))
        return y.reshape(t, -1)

    def fwd(x, logits, params):
        if method == "dense":
            return ffn_lib.ffn(x, params, activation="swiglu")
        if method in ("einsum", "capacity"):
            return grouped(x, logits, params)
        routing = make_routing(logits, k)
        if method == "ragged_dot":
            return ragged_dot_moe(x, routing, params)
        name, _, impl = method.partition(":")  # "dropless:xla" forces an impl
        strategy = name.partition("+")[0]
        return ffn_lib.moe_ffn(x, routing, params, strategy=strategy, impl=impl or "auto")

    def loss(x, logits, params):
        return jnp.sum(fwd(x, logits, params).astype(jnp.float32) ** 2)

    variant = method.partition(":")[0].partition("+")[2]  # "dropless+fused": an experiment
    if variant not in VARIANTS:
        raise ValueError(
            f"unknown variant {variant!r} in method {method!r}; known: {sorted(VARIANTS)}"
        )
    context = VARIANTS[variant]

    def traced(fn):  # under the variant's context while jit traces it (the backward too)
        def run(*args):
            with context():
                return fn(*args)

        return jax.jit(run)

    return traced(fwd), traced(jax.grad(loss, argnums=(0, 1, 2)))


def make_inputs(key, t, d, f, e, k, dtype, dense):
    ks = jax.random.split(key, 4)
    x = jax.random.normal(ks[0], (t, d), dtype)
    lead = () if dense else (e,)
    width = k * f if dense else f
    init = lambda kk, shape, fan: (jax.random.normal(kk, shape, jnp.float32) / fan**0.5).astype(
        dtype
    )
    params = {
        "wi_gate": init(ks[1], (*lead, d, width), d),
        "wi_up": init(ks[2], (*lead, d, width), d),
        "wo": init(ks[3], (*lead, width, d), width),
    }
    return x, params


def reference_error(fwd, args, k):
    """``|y - y_ref| / |y_ref|`` of ``fwd``'s output against modjax's per-expert loop
    (``moe_ffn_reference``) run in float32 on the same inputs and routing: the check that
    the timed kernels compute the layer, at the timed shape and dtype."""
    x, logits, params = args
    f32 = lambda a: a.astype(jnp.float32)
    ref = jax.jit(lambda x, lg, p: ffn_lib.moe_ffn_reference(
        f32(x), make_routing(lg, k), jax.tree.map(f32, p)))  # fmt: skip
    want = ref(*args)
    got = f32(fwd(*args))
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def time_fn(fn, args, iters, warmup=3):
    for _ in range(warmup):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
    if time.perf_counter() - t0 > 1.0:  # very slow baselines: fewer calls
        iters = min(iters, 3)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def temp_bytes(fn, args):
    try:
        m = fn.lower(*args).compile().memory_analysis()
        return int(m.temp_size_in_bytes)
    except Exception:
        return -1


def profile_fn(fn, args, path, calls=3):
    """A profiler trace of ``calls`` calls of ``fn`` (compiled and warm) under ``path``;
    ``python benchmarks/trace_summary.py PATH --steps 3`` tables it by op."""
    jax.block_until_ready(fn(*args))
    jax.profiler.start_trace(path)
    try:
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
    finally:
        jax.profiler.stop_trace()


def run_shape(name, t, d, f, e, k, dtype, methods, iters, log, profile="", hlo=""):
    key = jax.random.PRNGKey(0)
    flops = 6 * t * k * d * f
    rows = []
    dense_ms = {}
    cases = [(m, False) for m in methods] + [("dropless", True)]
    for method, skewed in cases:
        x, params = make_inputs(key, t, d, f, e, k, dtype, method == "dense")
        logits = make_logits(jax.random.fold_in(key, 7), t, e, skewed)
        fwd, grad = build(method, t, k, e, dtype)
        args = (x, logits, params)
        res = {}
        for mode, fn, mult in (("fwd", fwd, 1), ("fwd+bwd", grad, 3)):
            try:
                ms = time_fn(fn, args, iters)
                mem = temp_bytes(fn, args)
            except Exception as err:
                log(f"{name} {method} {mode}: failed: {type(err).__name__}: {str(err)[:200]}")
                ms, mem = float("nan"), -1
            res[mode] = (ms, mult * flops / ms / 1e9, mem)
            # file names without ':' or '+' (some file transfers refuse them)
            tag = f"{name}-{method.replace(':', '_').replace('+', '_')}"
            inspect = mode == "fwd+bwd" and not skewed and not math.isnan(ms)
            if profile and inspect:
                path = os.path.join(profile, tag)
                profile_fn(fn, args, path)
                log(f"{name} {method} fwd+bwd: trace of 3 calls in {path}")
            if hlo and inspect:
                os.makedirs(hlo, exist_ok=True)
                with open(os.path.join(hlo, f"{tag}.txt"), "w") as fh:
                    fh.write(fn.lower(*args).compile().as_text())
            if method == "dense":
                dense_ms[mode] = ms
        if method.startswith("dropless") or method == "ragged_dot":  # no token dropped
            try:
                res["err"] = reference_error(fwd, args, k)
            except Exception as err:
                log(f"{name} {method}: reference check failed: {type(err).__name__}: {err}")
        label = method + (" (skewed 80%->2)" if skewed else "")
        rows.append((label, res))
        log(f"{name} {label}: {res}")
    lines = [
        f"\n### {name}: T={t} D={d} F={f} E={e} k={k} {jnp.dtype(dtype).name}\n",
        "| method | fwd ms | fwd TFLOP/s | fwd ratio | fwd+bwd ms | fwd+bwd TFLOP/s "
        "| fwd+bwd ratio | temp MiB fwd / fwd+bwd | rel. error vs f32 reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, res in rows:
        (fm, ft, fmem), (bm, bt, bmem) = res["fwd"], res["fwd+bwd"]
        lines.append(
            f"| {label} | {fm:.3f} | {ft:.3g} | {dense_ms['fwd'] / fm:.2f} | {bm:.3f} | "
            f"{bt:.3g} | {dense_ms['fwd+bwd'] / bm:.2f} | "
            f"{fmem / 2**20:.0f} / {bmem / 2**20:.0f} | "
            + (f"{res['err']:.1e} |" if "err" in res else "- |")
        )
    return "\n".join(lines)


def _tiles():
    from modjax.kernels import pallas_gmm

    return pallas_gmm.TILES


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--shape", help="T,D,F,E,k (instead of a preset)")
    p.add_argument("--only", help="comma-separated preset shape names to run")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on gpu, float32 else")
    p.add_argument(
        "--methods",
        default="dense,einsum,capacity,ragged_dot,dropless",
        help="comma list; dropless:IMPL forces a grouped-matmul impl (e.g. dropless:xla); "
        "dropless+fused[:IMPL] is the fused-input-projection experiment; dropless+tblock "
        "and dropless+tragged trace the backward with modjax's block or jax's ragged "
        "weight-gradient kernel (Hopper; block is the default); dropless+cluster runs the "
        "block gmm in 2-CTA clusters; dropless+grouped the three grouped matmuls where "
        "the CPU would fuse them; dropless+scan the layout's block groups by a while loop; "
        "dropless+count / +sort the layout's ranks by a running count or a sort (the "
        "default counts on a GPU); dropless+pingpong the block gmm's ping-pong schedule at "
        "every K; dropless+coop short contractions cooperative (chained); dropless+unfused "
        "SwiGLU's activation as XLA's own pass (Hopper's default has it in the kernels); "
        "dropless+bwdall / +bwdnone the fused backward kernel at every width or none; "
        "dropless+nosum the input gradient as two gmm and a sum",
    )
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", help="also append the tables to this file")
    p.add_argument("--tiles", help="Pallas tiles, e.g. bk=64,bn=128,num_warps=8,num_stages=4")
    p.add_argument(
        "--hlo",
        default="",
        help="write the optimized HLO of each method's fwd+bwd to HLO/<shape>-<method>.txt "
        "(its fusion names are the trace's op names)",
    )
    p.add_argument(
        "--profile",
        default="",
        help="after timing, write a profiler trace of 3 fwd+bwd calls of each method to "
        "PROFILE/<shape>-<method> (for benchmarks/trace_summary.py)",
    )
    a = p.parse_args(argv)
    if a.tiles:
        from modjax.kernels import pallas_gmm

        pallas_gmm.TILES.update(
            {kv.split("=")[0]: int(kv.split("=")[1]) for kv in a.tiles.split(",")}
        )
    dtype = jnp.dtype(a.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32"))
    if a.shape:
        shapes = [("custom", *map(int, a.shape.split(",")))]
    else:
        shapes = PRESETS[a.preset or ("gpu" if jax.default_backend() == "gpu" else "cpu")]
    if a.only:
        shapes = [s for s in shapes if s[0] in a.only.split(",")]
    methods = a.methods.split(",")
    if "dense" not in methods:
        methods = ["dense", *methods]
    header = (
        f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
        f"{jax.__version__}, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"median of {a.iters} calls after 3 warm-up; Pallas tiles {_tiles()}"
    )
    tables = [header]
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(header + "\n")
    for shape in shapes:
        tables.append(run_shape(*shape, dtype, methods, a.iters, print, a.profile, a.hlo))
        if a.out:  # each shape as it finishes: a run cut short keeps what it measured
            with open(a.out, "a") as fh:
                fh.write(tables[-1] + "\n")
    print("\n".join(tables))


if __name__ == "__main__":
    main()
