"""Tile sweep of the grouped-matmul kernels, one kernel call at a time, against cuBLAS.

The dropless SwiGLU expert layer makes nine grouped matmuls: three forward
(``gmm``), three input gradients (``gmm`` with ``transpose_rhs``) and three weight
gradients (``tgmm``). By operand widths they are six kinds:

  ``up``      x[M, D] @ w[g, D, F]           (forward wi_gate, wi_up)
  ``down``    h[M, F] @ w[g, F, D]           (forward wo)
  ``up_t``    dy[M, D] @ w[g, F, D]^T        (input gradient through wo)
  ``down_t``  dh[M, F] @ w[g, D, F]^T        (input gradient through wi_*)
  ``tg_up``   x[M, D]^T dh[M, F] -> [g, D, F] (weight gradient of wi_*)
  ``tg_down`` h[M, F]^T dy[M, D] -> [g, F, D] (weight gradient of wo)

For each shape and kind this times the dense matmul of the same FLOPs (cuBLAS through
XLA), modjax's Pallas kernel at its default tiles and a few others, and jax's Mosaic GPU
kernels (``impl="mgpu"``) over a grid of tiles; it prints TFLOP/s (active FLOPs: real
rows, not padding) and the ratio to dense, and the best choice of each kind last.
Routing is balanced random (T*k assignments over E experts, 128-row blocks).

  PYTHONPATH=. python benchmarks/gmm_tiles.py --shapes olmoe,mixtral,small \\
      --budget 420 --out /tmp/gmm_tiles.jsonl

Each measurement is the mean over ``--iters`` calls queued back to back (one wait at the
end, so host dispatch is hidden), after two warm-up calls. ``--budget`` seconds bound the
whole sweep: what is left is skipped and said so (the table keeps what was measured).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from modjax.kernels import grouped_matmul as gm
from modjax.kernels import mgpu_block_gmm

SHAPES = {  # T, D, F, E, k (the three H200 shapes)
    "small": (8192, 512, 2048, 16, 2),
    "olmoe": (16384, 2048, 1024, 64, 8),
    "mixtral": (16384, 4096, 14336, 8, 2),
}
KINDS = ("up", "down", "up_t", "down_t", "tg_up", "tg_down")
BS = 128

PALLAS_GMM = [
    dict(bk=64, bn=256, num_warps=8, num_stages=3),
    dict(bk=64, bn=128, num_warps=4, num_stages=4),
    dict(bk=128, bn=256, num_warps=8, num_stages=2),
]
PALLAS_TGMM = [
    dict(t_bk=128, t_bn=128, t_num_warps=8, t_num_stages=3),
    dict(t_bk=128, t_bn=256, t_num_warps=8, t_num_stages=2),
    dict(t_bk=64, t_bn=256, t_num_warps=8, t_num_stages=3),
]
MGPU_GMM = [
    dict(block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=s, grid_block_n=g)
    for (bm, bn), s, g in itertools.product([(128, 128), (64, 256)], [4, 6], [1, 8])
]
MGPU_TGMM = [
    dict(block_m=bm, block_n=bn, block_k=64, max_concurrent_steps=s, grid_block_n=g)
    for (bm, bn), s, g in itertools.product([(128, 128), (64, 256)], [2, 4], [1, 8])
]

BLOCK_GMM = [  # modjax's own warp-specialised kernel (forward and input-gradient kinds)
    mgpu_block_gmm.Tiles(tile_n=128, stages=st, band=b, minor=mn)
    for st, b, mn in itertools.product([4, 3], [8, 16], ["n", "m"])
] + [mgpu_block_gmm.Tiles(tile_n=64, stages=6), mgpu_block_gmm.Tiles(tile_k=128, stages=2)]
BLOCK_GMM += [  # short contractions: overlap consecutive wgmmas, one-piece epilogue
    mgpu_block_gmm.TILES.replace(**kw)
    for kw in (dict(wait=1), dict(epi=128, stages=3), dict(epi=128, stages=3, wait=1),
               dict(wait=1, stages=3), dict(chain=True), dict(chain=True, minor="n"),
               dict(chain=True, stages=2))
]  # fmt: skip
BLOCK_GMM += [  # clusters of two CTAs sharing x tiles by TMA multicast (not yet run)
    mgpu_block_gmm.TILES.replace(**kw)
    for kw in (dict(cluster=2), dict(cluster=2, minor="n"), dict(cluster=2, band=16),
               dict(cluster=2, stages=3))
]  # fmt: skip
BLOCK_GMM += [  # ping-pong: each consumer warpgroup whole 128 x tile_n tiles, in turn
    mgpu_block_gmm.PINGPONG_TILES.replace(**kw)
    for kw in (dict(), dict(minor="n"), dict(band=16), dict(wait=0),
               dict(tile_k=128, stages=2))
]  # fmt: skip
BLOCK_TGMM = [  # modjax's own weight-gradient kernel (bf16 out)
    mgpu_block_gmm.T_TILES,
    mgpu_block_gmm.TTiles(band=8),
    mgpu_block_gmm.TTiles(stages=4),
    mgpu_block_gmm.TTiles(tile_n=64, tile_r=128, stages=2),
]
IMPLS = ("pallas", "mgpu", "block")


def _operands(kind, t, d, f, e, k, key):
    """The kernel's operands, its dense twin's, and the widths (K, N) of the kind."""
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, e, t * k), jnp.int32)
    _, _, layout = gm.sort_to_blocks(ids, e, BS)
    rows = layout.num_blocks * BS
    kk, nn = {"up": (d, f), "down": (f, d), "up_t": (d, f), "down_t": (f, d),
              "tg_up": (d, f), "tg_down": (f, d)}[kind]  # fmt: skip
    k1, k2 = jax.random.split(key)
    bf = jnp.bfloat16
    used = jnp.arange(rows) < layout.group_start[-1] * BS
    a = jnp.where(used[:, None], jax.random.normal(k1, (rows, kk), bf), 0).astype(bf)
    if kind.startswith("tg"):
        b = jnp.where(used[:, None], jax.random.normal(k2, (rows, nn), bf), 0).astype(bf)
        dense = (jax.random.normal(k1, (kk, t * k), bf), jax.random.normal(k2, (t * k, nn), bf))
    else:
        shape = (e, nn, kk) if kind.endswith("_t") else (e, kk, nn)
        b = (jax.random.normal(k2, shape, jnp.float32) / kk**0.5).astype(bf)
        dense = (jax.random.normal(k1, (t * k, kk), bf), jax.random.normal(k2, (kk, nn), bf))
    return layout, a, b, dense, 2 * t * k * kk * nn


def _call(kind, impl, tiles, layout):
    from modjax.kernels import mgpu_gmm, pallas_gmm

    bf = jnp.bfloat16
    if impl == "block" and kind.startswith("tg"):
        return jax.jit(  # the weight gradient in the weights' dtype, as the layer asks
            lambda a, b: mgpu_block_gmm.tgmm(a, b, layout.group_start, tiles=tiles, out_dtype=bf)
        )
    if impl == "block":
        trans = kind.endswith("_t")
        used = layout.group_start[-1]
        return jax.jit(
            lambda a, b: mgpu_block_gmm.gmm(
                a, b, layout.block_group, used, transpose_rhs=trans, tiles=tiles
            )
        )
    mod = mgpu_gmm if impl == "mgpu" else pallas_gmm
    extra = {"kernel": "ragged"} if impl == "mgpu" else {}  # "mgpu": jax's kernels
    if kind.startswith("tg"):
        if impl == "mgpu":
            extra["out_dtype"] = bf  # jax's kernel rounds to bf16 itself
        return jax.jit(lambda a, b: mod.tgmm(a, b, layout, block_size=BS, tiles=tiles, **extra))
    trans = kind.endswith("_t")
    return jax.jit(
        lambda a, b: mod.gmm(a, b, layout, block_size=BS, transpose_rhs=trans, tiles=tiles, **extra)
    )


def _time(fn, args, iters):
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(iters)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - t0) / iters * 1e3


def _candidates(kind, impls, where=None):
    """``(impl, tiles)`` to time; ``where`` (``{field: value}``) keeps, of the block
    kernels' tilings, those that match it and the defaults (``TILES``, the ping-pong and
    chained ones, ``T_TILES``; a weight-gradient tiling without one of the fields does not
    match)."""
    tg = kind.startswith("tg")
    table = {
        "pallas": PALLAS_TGMM if tg else PALLAS_GMM,
        "mgpu": MGPU_TGMM if tg else MGPU_GMM,
        "block": BLOCK_TGMM if tg else BLOCK_GMM,
    }

    def keep(impl, c):
        if impl != "block" or not where:
            return True
        defaults = (
            mgpu_block_gmm.TILES,
            mgpu_block_gmm.default_tiles(512),
            mgpu_block_gmm.default_tiles(768),  # chained cooperative pipelines
            mgpu_block_gmm.T_TILES,
        )
        return c in defaults or all(getattr(c, f, None) == v for f, v in where.items())

    return [("dense", None)] + [(i, c) for i in impls for c in table[i] if keep(i, c)]


def parse_where(text):
    """``"cluster=2,minor=n"`` -> ``{"cluster": 2, "minor": "n"}`` (fields of ``Tiles``)."""
    fields = {f.name: f.type for f in dataclasses.fields(mgpu_block_gmm.Tiles)}
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--where: {item!r} is not FIELD=VALUE of {sorted(fields)}")
        default = getattr(mgpu_block_gmm.Tiles(), key)
        out[key] = (value == "True") if isinstance(default, bool) else type(default)(value)
    return out


def sweep(shapes, iters, budget, log, impls=IMPLS, kinds=KINDS, where=None):
    start = time.perf_counter()
    rows = []
    for name in shapes:
        t, d, f, e, k = SHAPES[name]
        for kind in kinds:
            layout, a, b, dense, flops = _operands(kind, t, d, f, e, k, jax.random.PRNGKey(1))
            dense_fn = jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.bfloat16))
            for impl, tiles in _candidates(kind, impls, where):
                if time.perf_counter() - start > budget:
                    skip = {"shape": name, "kind": kind, "impl": impl, "skipped": "budget"}
                    log(json.dumps(skip))
                    continue
                shown = dataclasses.asdict(tiles) if dataclasses.is_dataclass(tiles) else tiles
                row = {"shape": name, "kind": kind, "impl": impl, "tiles": shown}
                try:
                    fn = dense_fn if impl == "dense" else _call(kind, impl, tiles, layout)
                    ms = _time(fn, dense if impl == "dense" else (a, b), iters)
                    row.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))
                except Exception as err:  # a tile the kernel rejects: recorded, not fatal
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                rows.append(row)
                log(json.dumps(row))
    return rows


def best_table(rows):
    lines = [
        "| shape | kind | dense TFLOP/s | pallas default | best pallas (tiles) "
        "| best mgpu (tiles) | best block (tiles) |",
        "|---|---|---|---|---|---|---|",
    ]
    keyed = {}
    for r in rows:
        if "ms" in r:
            keyed.setdefault((r["shape"], r["kind"]), []).append(r)
    fmt = lambda r: f"{r['tflops']:.0f} {r['tiles']}" if r else "-"
    best = lambda xs: max(xs, key=lambda x: x["tflops"]) if xs else None
    for (shape, kind), rs in keyed.items():
        dense = next((r for r in rs if r["impl"] == "dense"), None)
        pal = [r for r in rs if r["impl"] == "pallas"]
        mg = [r for r in rs if r["impl"] == "mgpu"]
        blk = [r for r in rs if r["impl"] == "block"]
        lines.append(
            f"| {shape} | {kind} | {dense['tflops'] if dense else '-'} | "
            f"{pal[0]['tflops'] if pal else '-'} | {fmt(best(pal))} | {fmt(best(mg))} "
            f"| {fmt(best(blk))} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="olmoe,mixtral,small")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole sweep")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"kernels to sweep, of {IMPLS}")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"matmuls to time, of {KINDS}")
    p.add_argument("--out", help="append each measurement to this JSONL file")
    p.add_argument(
        "--where",
        help="block gmm tilings to keep, e.g. cluster=2 (the defaults are always timed)",
    )
    a = p.parse_args(argv)
    where = parse_where(a.where)
    names = a.shapes.split(",")
    for n in names:
        if n not in SHAPES:
            raise ValueError(f"--shapes: unknown shape {n!r}; known: {sorted(SHAPES)}")
    impls, kinds = a.impls.split(","), a.kinds.split(",")
    for flag, got, known in (("--impls", impls, IMPLS), ("--kinds", kinds, KINDS)):
        bad = [x for x in got if x not in known]
        if bad:
            raise ValueError(f"{flag}: unknown {bad}; known: {list(known)}")
    fh = open(a.out, "a") if a.out else None

    def log(line):
        print(line, flush=True)
        if fh:
            fh.write(line + "\n")
            fh.flush()

    rows = sweep(names, a.iters, a.budget, log, impls, kinds, where)
    print(f"\ndevice: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(best_table(rows))
    return rows


if __name__ == "__main__":
    main()
