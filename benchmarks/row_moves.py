"""The MoE layer's row moves: modjax's Pallas kernels against XLA's gathers.

Times, per shape and on the same inputs, the four moves of the dropless layer between
tokens ``[T, D]`` and the block-padded layout ``[P, D]``: the layout's input
(``to_blocks``) and its gradient, the combine (``combine_from_blocks``) and its
gradient (rows and routing weights). ``xla`` forces XLA's gathers (``impl="xla"``),
``kernels`` forces the kernels (``impl="pallas"``, :mod:`modjax.kernels.pallas_rows`;
``impl="auto"`` takes the scatters on a GPU and XLA's sums). It checks that
both give the same values, and prints ms, the bytes each move must read and write over
its time (GB/s), and the speed-up::

  PYTHONPATH=. python3 benchmarks/row_moves.py [--shapes T,D,E,k;...] [--iters 50]

``--sweep`` times the kernels alone at each tiling of :data:`SWEEP` (changes to
:data:`modjax.kernels.pallas_rows.SCATTER_TILES` / ``GATHER_TILES``, where those defaults
come from) and prints the best few per move; ``--moves "to_blocks,combine grad"`` sweeps
only those (the scatter kernel's two moves).
"""

from __future__ import annotations

import argparse
import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.block_moves import _median_ms
from modjax.kernels import grouped_matmul as gm
from modjax.kernels import pallas_rows as pr

SHAPES = "8192,512,16,2;16384,2048,64,8;16384,4096,8,2"


def moves(t: int, d: int, e: int, k: int, dtype, rng):
    """``{name: (fn(impl) -> jitted call, bytes moved)}`` on one shape's inputs."""
    ids = jnp.asarray(rng.integers(0, e, t * k), jnp.int32)
    valid = jnp.ones((t * k,), bool)
    pos, src, _ = gm.sort_to_blocks(ids, e, 128, valid)
    p = src.shape[0]
    x = jnp.asarray(rng.normal(size=(t, d)), dtype)
    yp = jnp.asarray(rng.normal(size=(p, d)), dtype)
    w = jnp.asarray(rng.random((t, k)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(t, d)), dtype)
    item = jnp.dtype(dtype).itemsize
    tok, rows, placed = t * d * item, p * d * item, t * k * d * item

    def to(impl):
        f = jax.jit(lambda x: gm.to_blocks(x, src, pos, valid, k, impl=impl))
        return lambda: f(x)

    def to_grad(impl):
        f = jax.jit(lambda g: jax.vjp(lambda x: gm.to_blocks(x, src, pos, valid, k, impl=impl),
                                      x)[1](g))  # fmt: skip
        return lambda: f(yp)

    def comb(impl):
        f = jax.jit(lambda yp, w: gm.combine_from_blocks(yp, w, pos, src, valid, impl=impl))
        return lambda: f(yp, w)

    def comb_grad(impl):
        f = jax.jit(lambda dy: jax.vjp(
            lambda yp, w: gm.combine_from_blocks(yp, w, pos, src, valid, impl=impl), yp, w
        )[1](dy))  # fmt: skip
        return lambda: f(dy)

    return {
        "to_blocks": (to, tok + rows),
        "to_blocks grad": (to_grad, placed + tok),
        "combine": (comb, placed + tok),
        "combine grad": (comb_grad, tok + 2 * placed + rows),
    }


def _tilings(*rows) -> list[dict]:
    return [dict(zip(("bt", "bd", "num_warps", "split"), r)) for r in rows]


# fmt: off
#: the tilings --sweep tries, per kernel: tokens per program, row piece, warps (and
#: column groups): from many short pieces per program to one program per whole row piece
SWEEP = {
    "SCATTER_TILES": _tilings(
        (32, 128, 8, 1), (32, 128, 8, 4), (32, 128, 8, 16), (32, 128, 4, 16), (16, 256, 8, 1),
        (16, 256, 4, 8), (8, 512, 8, 1), (8, 512, 4, 4), (4, 1024, 4, 1), (4, 2048, 4, 1),
        (4, 2048, 8, 1), (2, 2048, 4, 1), (8, 2048, 8, 1),
    ),
    "GATHER_TILES": _tilings(
        (8, 512, 8), (4, 1024, 8), (4, 2048, 8), (2, 2048, 4), (2, 2048, 8), (1, 2048, 4),
        (16, 256, 4), (8, 1024, 8), (8, 2048, 8), (4, 512, 4),
    ),
}
# fmt: on


@contextlib.contextmanager
def _tiles(name: str, tiles: dict):
    old = getattr(pr, name)
    setattr(pr, name, {**old, **tiles})
    try:
        yield
    finally:
        setattr(pr, name, old)


def sweep(t, d, e, k, dtype, iters, rng, only=None, top=3) -> None:
    """The kernels' time at each tiling of SWEEP, per move (those in ``only``, if given);
    the ``top`` best printed."""
    for name, (make, nbytes) in moves(t, d, e, k, dtype, rng).items():
        if only and name not in only:
            continue
        which = "SCATTER_TILES" if name in ("to_blocks", "combine grad") else "GATHER_TILES"
        found = []
        for tiles in SWEEP[which]:
            with _tiles(which, tiles):
                fn = make("pallas")  # traced (and the tiles read) on the first call
                jax.block_until_ready(fn())
            found.append((_median_ms(fn, iters), tiles))
        found.sort(key=lambda r: r[0])
        for ms, tiles in found[:top]:
            print(f"| {t} | {d} | {e} | {k} | {name} | {tiles} | {ms:.3f} | "
                  f"{nbytes / ms / 1e6:.0f} |")  # fmt: skip


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=SHAPES, help="T,D,E,k;... (tokens, width, experts, k)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--sweep", action="store_true", help="the kernels' tilings instead")
    p.add_argument("--top", type=int, default=3, help="--sweep prints this many per move")
    p.add_argument("--moves", default="", help="--sweep only these moves (comma-separated; "
                   "each move's sweep takes ~2 min on an H200, most of it compiling)")  # fmt: skip
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    out = []
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {a.dtype}")
    if a.sweep:
        print("| T | D | E | k | move | tiles | ms | GB/s |\n|---|---|---|---|---|---|---|---|")
        for shape in a.shapes.split(";"):
            t, d, e, k = (int(v) for v in shape.split(","))
            only = [m for m in a.moves.split(",") if m]
            sweep(t, d, e, k, jnp.dtype(a.dtype), a.iters, rng, only, a.top)
        return out
    print("| T | D | E | k | move | xla ms (GB/s) | kernels ms (GB/s) | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in a.shapes.split(";"):
        t, d, e, k = (int(v) for v in shape.split(","))
        for name, (make, nbytes) in moves(t, d, e, k, jnp.dtype(a.dtype), rng).items():
            xla, fast = make("xla"), make("pallas")
            for u, v in zip(jax.tree.leaves(xla()), jax.tree.leaves(fast())):
                np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32),
                                           rtol=2e-2, atol=2e-2)  # fmt: skip
            ms = [_median_ms(f, a.iters) for f in (xla, fast)]
            gbs = [nbytes / m / 1e6 for m in ms]
            out.append(dict(T=t, D=d, E=e, k=k, move=name, xla_ms=ms[0], kernels_ms=ms[1]))
            print(f"| {t} | {d} | {e} | {k} | {name} | {ms[0]:.3f} ({gbs[0]:.0f}) | "
                  f"{ms[1]:.3f} ({gbs[1]:.0f}) | {ms[0] / ms[1]:.2f}x |")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
