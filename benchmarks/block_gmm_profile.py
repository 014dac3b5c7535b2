"""Where the block kernel's time goes, tile by tile (Mosaic GPU's on-device profiler).

``mgpu_block_gmm.gmm(..., profile_dir=...)`` records, per warpgroup, a ``tile`` span around
each output tile and, in the two consumer warpgroups, its ``mainloop`` (the ``wgmma``
pipeline) and ``epilogue`` (the stores) inside it. This script runs the kernel with the
profiler for a few tilings, reads the traces and prints, per tiling, the medians over
all tiles of all SMs, in SM clock cycles:

* ``period``: from one tile's mainloop start to the next one's, per consumer warpgroup;
* ``main``: the mainloop, and ``ideal``: its cycles at the tensor cores' peak (dense bf16
  ``wgmma``: 4096 FLOP per cycle per SM on the H100/H200), so ``main/ideal`` is the
  mainloop's own efficiency;
* ``epi``: the epilogue; ``other``: the rest of the period (what lies between one tile's
  epilogue and the next one's mainloop: the pipeline's setup and the first loads);
* ``prod``: the producer warpgroup's span per tile (issue and wait for its loads);
* ``first``: the first tile's mainloop (cold start) of each program.

With the profiler, a program records at most ``PROFILE_SPANS`` spans per warpgroup, so
the profiled problem is cut to ``--tiles-per-sm`` tiles per SM (its blocks spread over
``--groups`` groups), and the trace is of the first profiled call. Each tiling is also
timed without the profiler at the profiled shape (``TFLOP/s``).

  PYTHONPATH=. python benchmarks/block_gmm_profile.py --out /tmp/prof
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from modjax.kernels import mgpu_block_gmm as bg

#: (name, K, N, transpose_rhs): OLMoE-like widths (D=2048, F=1024)
SHAPES = {
    "up": (2048, 1024, False),
    "down": (1024, 2048, False),
    "down_t": (1024, 2048, True),
}
#: tilings profiled: ``TILES`` (the default from K = 2048; below, ``default_tiles`` chains
#: the pipelines with bands along N), its 3-stage twin, chained pipelines and 128-wide tiles
TILINGS = {
    "default": bg.TILES,
    "stages3": bg.TILES.replace(stages=3),
    "chain": bg.TILES.replace(chain=True),
    "tn64": bg.Tiles(tile_n=64, stages=6, minor="m"),
}
PEAK_FLOP_PER_CYCLE = 4096


def spans(trace: dict) -> dict[int, list[tuple[str, float, float]]]:
    """``tid -> [(name, begin, end)]`` in cycles, from a Mosaic GPU profiler trace."""
    out: dict[int, list] = {}
    stacks: dict[int, list] = {}
    for ev in trace["traceEvents"]:
        tid, ts = ev["tid"], ev["ts"] * 1e3  # the dump divides raw clock cycles by 1e3
        if ev["ph"] == "B":
            stacks.setdefault(tid, []).append((ev["name"], ts))
        else:
            name, begin = stacks[tid].pop()
            out.setdefault(tid, []).append((name, begin, ts))
    return out


def summarize(trace: dict, k_iters: int, tile_flops: float, threads: int = 3) -> dict:
    """Medians (cycles) of the spans described in the module docstring."""
    by_tid = spans(trace)
    main, epi, period, other, prod, first, tiles = [], [], [], [], [], [], []
    for tid, rows in by_tid.items():
        role = (tid - 1) % threads
        tile = sorted((b, e) for n, b, e in rows if n == "tile")
        if role == threads - 1:  # the producer warpgroup
            prod += [e - b for b, e in tile]
            tiles.append(len(tile))
            continue
        m = sorted((b, e) for n, b, e in rows if n == "mainloop")
        ep = sorted((b, e) for n, b, e in rows if n == "epilogue")
        main += [e - b for b, e in m]
        epi += [e - b for b, e in ep]
        if m:
            first.append(m[0][1] - m[0][0])
        for (b0, e0), (b1, _), (eb, ee) in zip(m, m[1:], ep):
            period.append(b1 - b0)
            other.append(b1 - b0 - (e0 - b0) - (ee - eb))
    med = lambda v: float(statistics.median(v)) if v else float("nan")
    return {
        "tiles_per_sm": med(tiles),
        "period": med(period),
        "main": med(main),
        "ideal": k_iters * tile_flops / PEAK_FLOP_PER_CYCLE,
        "epi": med(epi),
        "other": med(other),
        "prod": med(prod),
        "first": med(first),
    }


def operands(k, n, transpose, blocks, groups, key):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (blocks * bg.BLOCK_M, k), jnp.bfloat16)
    shape = (groups, n, k) if transpose else (groups, k, n)
    w = (jax.random.normal(kw, shape, jnp.float32) / k**0.5).astype(jnp.bfloat16)
    group = jnp.asarray(np.repeat(np.arange(groups), -(-blocks // groups))[:blocks], jnp.int32)
    return x, w, group


def run(shape, tiling, tiles_per_sm, groups, out_dir, iters=20):
    k, n, transpose = SHAPES[shape]
    t = TILINGS[tiling]
    sms = int(jax.devices()[0].core_count)
    n_tiles = n // (2 * t.tile_n)
    blocks = max(1, tiles_per_sm * sms // n_tiles)
    x, w, group = operands(k, n, transpose, blocks, groups, jax.random.PRNGKey(0))
    used = jnp.int32(blocks)
    flops = 2 * blocks * bg.BLOCK_M * k * n

    plain = jax.jit(lambda x, w: bg.gmm(x, w, group, used, transpose_rhs=transpose, tiles=t))
    for _ in range(3):
        ref = jax.block_until_ready(plain(x, w))
    t0 = time.perf_counter()
    jax.block_until_ready([plain(x, w) for _ in range(iters)])
    ms = (time.perf_counter() - t0) / iters * 1e3

    d = os.path.join(out_dir, f"{shape}-{tiling}")
    os.makedirs(d, exist_ok=True)
    for old in glob.glob(os.path.join(d, "*-trace.json")):  # an earlier run's
        os.remove(old)
    prof = jax.jit(
        lambda x, w: bg.gmm(x, w, group, used, transpose_rhs=transpose, tiles=t, profile_dir=d)
    )
    got = jax.block_until_ready(prof(x, w))
    jax.effects_barrier()
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32))))
    # one trace per kernel and directory: jax keeps the first call's (a later call warns)
    first = sorted(glob.glob(os.path.join(d, "*-trace.json")))[0]
    with open(first) as f:
        trace = json.load(f)
    tile_flops = 2 * bg.BLOCK_M * 2 * t.tile_n * t.tile_k
    row = {"shape": shape, "K": k, "N": n, "tiling": tiling, "blocks": blocks,
           "ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1),
           "profiled_vs_plain_max_diff": err}  # fmt: skip
    row.update({a: round(b, 1) for a, b in summarize(trace, k // t.tile_k, tile_flops).items()})
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="down,up")
    p.add_argument("--tilings", default=",".join(TILINGS))
    p.add_argument("--tiles-per-sm", type=int, default=bg.PROFILE_SPANS // 3 - 1)
    p.add_argument("--groups", type=int, default=64)
    p.add_argument("--out", default="/tmp/block_gmm_profile")
    a = p.parse_args(argv)
    rows = []
    for shape in a.shapes.split(","):
        for tiling in a.tilings.split(","):
            try:
                row = run(shape, tiling, a.tiles_per_sm, a.groups, a.out)
            except Exception as err:  # a tiling that does not fit: recorded, not fatal
                msg = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                row = {"shape": shape, "tiling": tiling, "error": msg}
            print(json.dumps(row), flush=True)
            rows.append(row)
    cols = ["tflops", "period", "main", "ideal", "epi", "other", "prod", "first", "tiles_per_sm"]
    print("\n| shape | tiling | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        vals = [str(r.get(c, r.get("error", ""))) for c in cols]
        print(f"| {r['shape']} | {r['tiling']} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main()
