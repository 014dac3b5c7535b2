"""Pallas (Triton-lowered) kernels for grouped matmul on a block-padded operand.

Written for modjax (not a wrapper of jax's shipped ops). Each block of ``block_size``
rows belongs to one group (see :mod:`modjax.kernels.grouped_matmul`), so the kernels are
race-free without atomics:

* ``gmm``: grid ``(Nb, N / bn)``; program ``(b, j)`` reads its group ``g = block_group[b]``
  and accumulates ``x[b] @ w[g][:, j]`` over K in float32. Unused blocks write zeros.
* ``tgmm``: grid ``(G, K / bk, N / bn)``; program ``(g, i, j)`` loops over group g's blocks
  (a contiguous range) accumulating ``x[b][:, i].T @ dy[b][:, j]``. Empty groups write 0.

Widths that are not multiples of the tile are zero-padded around the call. Tile sizes
must be powers of two (Triton); ``block_size`` too, and at least 16.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from modjax.typing import Array

#: Tiles (bk: contracting, bn: output columns) and launch settings of ``gmm``, and of
#: ``tgmm`` (``t_*``); picked from a short sweep on H200 (benchmarks/RESULTS.md). tgmm
#: keeps 3 stages: 4 stages of two 128x128 bf16 tiles exceed Hopper's shared memory.
TILES = {
    "bk": 64,
    "bn": 256,
    "num_warps": 8,
    "num_stages": 3,
    "t_bk": 128,
    "t_bn": 128,
    "t_num_warps": 8,
    "t_num_stages": 3,
}


def _pow2_at_most(n: int, cap: int) -> int:
    p = 16
    while p < cap and p < n:
        p *= 2
    return p


def _pad_to(a: Array, axis: int, multiple: int) -> Array:
    extra = (-a.shape[axis]) % multiple
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return jnp.pad(a, widths)


def _check_block(block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(
            f"block_size must be a power of two >= 16 for the Pallas kernels, got {block_size}"
        )


def _gmm_kernel(bg_ref, gs_ref, x_ref, w_ref, o_ref, *, bk, bn, nk, num_groups, trans):
    b = pl.program_id(0)
    j = pl.program_id(1)
    used = b < gs_ref[num_groups]

    @pl.when(used)
    def _():
        g = bg_ref[b]

        def body(kk, acc):
            xk = x_ref[:, pl.ds(kk * bk, bk)]
            if trans:
                wk = w_ref[g, pl.ds(j * bn, bn), pl.ds(kk * bk, bk)]
                return acc + plgpu.dot(xk, wk, trans_b=True)
            wk = w_ref[g, pl.ds(kk * bk, bk), pl.ds(j * bn, bn)]
            return acc + plgpu.dot(xk, wk)

        acc = jax.lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.float32))
        o_ref[...] = acc.astype(o_ref.dtype)

    @pl.when(jnp.logical_not(used))
    def _():
        o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)


def gmm(
    x: Array,
    w: Array,
    layout,
    *,
    block_size: int,
    transpose_rhs: bool = False,
    interpret: bool = False,
    tiles: dict | None = None,
) -> Array:
    """``out[b] = x[b] @ w[group(b)]`` (or ``.T``); see the module docstring."""
    _check_block(block_size)
    t = {**TILES, **(tiles or {})}
    k = x.shape[1]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    bk = _pow2_at_most(k, t["bk"])
    bn = _pow2_at_most(n, t["bn"])
    xp = _pad_to(x, 1, bk)
    wp = _pad_to(_pad_to(w, 1, bn if transpose_rhs else bk), 2, bk if transpose_rhs else bn)
    kp, np_ = xp.shape[1], -(-n // bn) * bn
    nb = layout.num_blocks
    kernel = functools.partial(
        _gmm_kernel, bk=bk, bn=bn, nk=kp // bk, num_groups=layout.num_groups, trans=transpose_rhs
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((nb * block_size, np_), x.dtype),
        grid=(nb, np_ // bn),
        in_specs=[
            pl.no_block_spec,
            pl.no_block_spec,
            pl.BlockSpec((block_size, kp), lambda b, j: (b, 0)),
            pl.no_block_spec,
        ],
        out_specs=pl.BlockSpec((block_size, bn), lambda b, j: (b, j)),
        compiler_params=plgpu.CompilerParams(num_warps=t["num_warps"], num_stages=t["num_stages"]),
        interpret=interpret,
        name="modjax_gmm",
    )(layout.block_group, layout.group_start, xp, wp)
    return out[:, :n]


def _tgmm_kernel(gs_ref, x_ref, dy_ref, o_ref, *, bm, bk, bn):
    g = pl.program_id(0)
    i_k = pl.program_id(1)
    j = pl.program_id(2)

    start = gs_ref[g]
    count = gs_ref[g + 1] - start

    # A literal lower bound and an int32 upper bound lower to a pipelined scf.for.
    def body(i, acc):
        b = start + i
        xb = x_ref[pl.ds(b * bm, bm), pl.ds(i_k * bk, bk)]
        db = dy_ref[pl.ds(b * bm, bm), pl.ds(j * bn, bn)]
        return acc + plgpu.dot(xb, db, trans_a=True)

    acc = jax.lax.fori_loop(0, count, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc


def tgmm(
    x: Array,
    dy: Array,
    layout,
    *,
    block_size: int,
    interpret: bool = False,
    tiles: dict | None = None,
) -> Array:
    """float32 ``dw[g] = sum_{b in g} x[b].T @ dy[b]``, ``[G, K, N]``."""
    _check_block(block_size)
    t = {**TILES, **(tiles or {})}
    k, n = x.shape[1], dy.shape[1]
    bk = _pow2_at_most(k, t["t_bk"])
    bn = _pow2_at_most(n, t["t_bn"])
    xp = _pad_to(x, 1, bk)
    dyp = _pad_to(dy, 1, bn)
    g = layout.num_groups
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, bm=block_size, bk=bk, bn=bn),
        out_shape=jax.ShapeDtypeStruct((g, xp.shape[1], dyp.shape[1]), jnp.float32),
        grid=(g, xp.shape[1] // bk, dyp.shape[1] // bn),
        in_specs=[pl.no_block_spec, pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.BlockSpec((None, bk, bn), lambda g, i, j: (g, i, j)),
        compiler_params=plgpu.CompilerParams(
            num_warps=t["t_num_warps"], num_stages=t["t_num_stages"]
        ),
        interpret=interpret,
        name="modjax_tgmm",
    )(layout.group_start, xp, dyp)
    return out[:, :k, :n]
