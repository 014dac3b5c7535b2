"""Moving MoE rows into and out of the block-padded layout, forward + backward.

``modjax.kernels.grouped_matmul.to_blocks`` / ``from_blocks`` give both moves gather-only
gradients (``position`` and ``source`` are inverse maps); written as plain ``jnp.take``
(the reference twins) their gradients are scatter-adds. This times the gradient of
``from_blocks(to_blocks(x) * 1.5)`` both ways on the same inputs and prints the ratio::

  PYTHONPATH=. python benchmarks/block_moves.py [--shapes T,D,E,k;...] [--iters 30]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from modjax.kernels import grouped_matmul as gm

SHAPES = "2048,256,16,2;2048,256,64,8;16384,1024,64,8"


def _median_ms(fn, iters: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def time_shape(t: int, d: int, e: int, k: int, dtype: str, iters: int, rng) -> dict:
    """Median ms of the gradient with gather-only moves and with plain ``jnp.take``."""
    ids = jnp.asarray(rng.integers(0, e, t * k), jnp.int32)
    valid = jnp.ones((t * k,), bool)
    pos, src, _ = gm.sort_to_blocks(ids, e, 128, valid)
    x = jnp.asarray(rng.normal(size=(t, d)), dtype)

    def grad_fn(to, back):
        def loss(x):
            y = back(to(x, src, pos, valid, k) * 1.5, pos, src, valid)
            return jnp.sum(y.astype(jnp.float32) ** 2)

        return jax.jit(jax.grad(loss))

    fast = grad_fn(gm.to_blocks, gm.from_blocks)
    ref = grad_fn(gm.to_blocks_reference, gm.from_blocks_reference)
    np.testing.assert_allclose(
        np.asarray(fast(x), np.float32), np.asarray(ref(x), np.float32), rtol=2e-2, atol=2e-2
    )
    return dict(T=t, D=d, E=e, k=k, gather_ms=_median_ms(lambda: fast(x), iters),
                scatter_ms=_median_ms(lambda: ref(x), iters))  # fmt: skip


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=SHAPES, help="T,D,E,k;... (tokens, width, experts, k)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.dtype}")
    print("| T | D | E | k | gather-grad ms | scatter-grad ms (plain take) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(";"):
        t, d, e, k = (int(v) for v in shape.split(","))
        r = time_shape(t, d, e, k, args.dtype, args.iters, rng)
        rows.append(r)
        a, b = r["gather_ms"], r["scatter_ms"]
        print(f"| {t} | {d} | {e} | {k} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
