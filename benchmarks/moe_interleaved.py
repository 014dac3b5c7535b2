"""Interleaved timing of the MoE layer against the dense FFN, for noisy shared machines.

``moe_layer.py`` times one method after another; on a small shared CPU the machine's
speed drifts by tens of percent between them. Here every method is compiled first, then
timed in ``--rounds`` rounds, each round calling every method in turn (fwd, then
fwd+bwd) ``--iters`` times; the table gives, per method, the median over all calls and
the ratio to the dense FFN (and the ratio of the fastest calls, ``min-ratio``).

Methods are ``moe_layer.py``'s, its variants included (``dropless+grouped``: the three
grouped matmuls of ``expert_ffn_blocks`` and 128-row blocks even where ``auto`` would
take the fused XLA loop, the path the CPU had before that loop existed; the older
spelling ``dropless@grouped`` is the same).

  PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/moe_interleaved.py \\
      --shapes cpu-a,cpu-b --methods dropless,dropless+grouped --rounds 8
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import moe_layer


def build(method, t, d, f, e, k, dtype):
    """Compiled ``(fwd, grad, args)`` of a method, warm."""
    key = jax.random.PRNGKey(0)
    x, params = moe_layer.make_inputs(key, t, d, f, e, k, dtype, method == "dense")
    logits = moe_layer.make_logits(jax.random.fold_in(key, 7), t, e, False)
    args = (x, logits, params)
    fwd, grad = moe_layer.build(method.replace("@", "+"), t, k, e, dtype)
    jax.block_until_ready(fwd(*args))
    jax.block_until_ready(grad(*args))
    return fwd, grad, args


def run(shape, methods, rounds, iters, dtype):
    t, d, f, e, k = shape
    fns = {m: build(m, t, d, f, e, k, dtype) for m in ["dense", *methods]}
    times = {m: ([], []) for m in fns}
    for _ in range(rounds):
        for m, (fwd, grad, args) in fns.items():
            for i, fn in enumerate((fwd, grad)):
                for _ in range(iters):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(*args))
                    times[m][i].append(time.perf_counter() - t0)
    return times


def table(name, times):
    dense = [np.median(v) for v in times["dense"]]
    fastest = [min(v) for v in times["dense"]]
    lines = [
        f"\n### {name}\n",
        "| method | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | fwd+bwd min-ratio |",
        "|---|---|---|---|---|---|",
    ]
    for m, (fv, bv) in times.items():
        fm, bm = np.median(fv), np.median(bv)
        lines.append(
            f"| {m} | {fm * 1e3:.4g} | {dense[0] / fm:.2f} | {bm * 1e3:.4g} | "
            f"{dense[1] / bm:.2f} | {fastest[1] / min(bv):.2f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="cpu-a,cpu-b", help="preset shape names")
    p.add_argument("--shape", help="T,D,F,E,k (instead of --shapes)")
    p.add_argument("--methods", default="dropless,dropless+grouped")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--iters", type=int, default=1, help="calls per method per round")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on gpu, float32 else")
    a = p.parse_args(argv)
    presets = {n: s for n, *s in (row for rows in moe_layer.PRESETS.values() for row in rows)}
    if a.shape:
        shapes = {"custom": tuple(int(v) for v in a.shape.split(","))}
    else:
        unknown = [n for n in a.shapes.split(",") if n not in presets]
        if unknown:
            raise ValueError(f"--shapes: unknown {unknown}; known: {sorted(presets)}")
        shapes = {n: presets[n] for n in a.shapes.split(",")}
    if a.rounds < 1 or a.iters < 1:
        raise ValueError(f"--rounds and --iters must be >= 1, got {a.rounds}, {a.iters}")
    methods = [m for m in a.methods.split(",") if m != "dense"]
    dtype = jnp.dtype(a.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32"))
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{dtype.name}, {a.rounds} rounds x {a.iters} calls, medians")  # fmt: skip
    out = []
    for name, shape in shapes.items():
        out.append(
            table(f"{name}: T,D,F,E,k = {shape}", run(shape, methods, a.rounds, a.iters, dtype))
        )
        print(out[-1], flush=True)
    return "\n".join(out)


if __name__ == "__main__":
    main()
