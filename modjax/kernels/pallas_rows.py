"""Pallas (Triton-lowered) kernels that move MoE rows into and out of the block-padded
layout of :func:`modjax.kernels.grouped_matmul.sort_to_blocks`.

Written for modjax. The XLA forms of these moves are gathers over the ``[P, D]`` layout
(``P`` ~ ``T*k`` rows); XLA runs them at well under the copy ceiling on an H200, and the
forms that read each token's row ``k`` times read ``k`` times the bytes needed. These
kernels walk the *tokens* instead, ``bt`` tokens per program:

* :func:`scatter_rows`: ``out[pos[t, j]] = scale[t, j] * x[t]`` over the valid
  assignments, padding rows zero (the layout's input, and the combine's gradient). Each
  token row is read once and written ``k`` times; with ``dot_with`` it also returns
  ``dw[t, j] = <dot_with[pos[t, j]], x[t]>`` (the routing weights' gradient) from the
  same pass.
* :func:`gather_sum`: ``out[t] = sum_j scale[t, j] * yp[pos[t, j]]`` (the combine, and
  the layout input's gradient), float32 accumulation.

Rows are whole (``D`` a multiple of 16) and each program holds ``[bt, bd]`` pieces, so
no atomics and no shared-memory staging are needed; the positions are unique, so the
scattered stores never collide. Their reference twins are the XLA gathers in
:mod:`modjax.kernels.grouped_matmul`; ``tests/kernels/test_pallas_rows.py`` holds them
equal in interpret mode on CPU and compiled on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from modjax.typing import Array

#: :func:`scatter_rows`: tokens per program, the widest row piece it holds at a time, the
#: most column groups each token block is split into (one program per group, each
#: looping over its pieces; the largest count that divides the row's pieces), its warps,
#: and the padded rows per zeroing program
#: (``benchmarks/row_moves.py --sweep`` on the H200: at OLMoE's and Mixtral's shapes,
#: splitting each block's row into 4 groups was best or within 2% of the best for both
#: of its moves, 0.330 against 0.354 ms for OLMoE's layout input)
SCATTER_TILES = {"bt": 32, "bd": 128, "split": 4, "num_warps": 8, "br": 64}
#: :func:`gather_sum`: tokens and row piece per program, and its warps
GATHER_TILES = {"bt": 8, "bd": 512, "num_warps": 8}


def fits(d: int) -> bool:
    """Whether rows ``D`` wide take these kernels (Triton needs power-of-two pieces)."""
    return d % 16 == 0


def _piece(d: int, cap: int) -> int:
    bd = 16
    while bd * 2 <= cap and d % (bd * 2) == 0:
        bd *= 2
    return bd


def _check(name: str, d: int) -> None:
    if not fits(d):
        raise ValueError(f"{name}: row width D={d} must be a multiple of 16 for the kernels")


def _rows(ref, rows: Array, start, width: int):
    """``ref[rows, start:start + width]`` as one integer-array index (the form both the
    Triton lowering and the interpreter take; masked lanes must point out of range so
    the interpreter's scatter drops them)."""
    return ref.at[rows[:, None], (start + jnp.arange(width))[None, :]]


def _token_blocks(pos: Array, scale: Array | None, bt: int):
    """``pos [T, k]`` (``-1`` for invalid) and ``scale`` padded to whole token blocks."""
    t = pos.shape[0]
    extra = (-t) % bt
    pos = jnp.pad(pos.astype(jnp.int32), ((0, extra), (0, 0)), constant_values=-1)
    if scale is not None:
        scale = jnp.pad(scale.astype(jnp.float32), ((0, extra), (0, 0)))
    return pos, scale


def _scatter_kernel(*refs, k, bt, bd, nd, ns, nt, br, num_tokens, num_rows, weighted, dot):
    it = iter(refs)
    pos_ref = next(it)
    scale_ref = next(it) if weighted else None
    src_ref = next(it)
    x_ref = next(it)
    yp_ref = next(it) if dot else None
    out_ref = next(it)
    dw_ref = next(it) if dot else None
    i = pl.program_id(0)
    per = nd // ns  # pieces per column group

    @pl.when(i < nt * ns)
    def _():
        b, s = i // ns, i % ns  # token block, column group (adjacent programs: same rows)
        tok = b * bt + jnp.arange(bt)
        live = tok < num_tokens
        pos = [pos_ref[pl.ds(b * bt, bt), j] for j in range(k)]
        ok = [p >= 0 for p in pos]  # the padded tokens' positions are -1
        row = [jnp.where(o, p, num_rows) for p, o in zip(pos, ok)]
        scale = [scale_ref[pl.ds(b * bt, bt), j] for j in range(k)] if weighted else None

        def body(c, acc):
            col = (s * per + c) * bd
            xc = plgpu.load(_rows(x_ref, tok, col, bd), mask=live[:, None], other=0)
            out = []
            for j in range(k):
                v = xc.astype(jnp.float32)
                if weighted:
                    v = v * scale[j][:, None]
                m = ok[j][:, None]
                plgpu.store(_rows(out_ref, row[j], col, bd), v.astype(out_ref.dtype), mask=m)
                if dot:
                    yc = plgpu.load(_rows(yp_ref, row[j], col, bd), mask=m, other=0)
                    prod = yc.astype(jnp.float32) * xc.astype(yp_ref.dtype).astype(jnp.float32)
                    out.append(acc[j] + jnp.sum(prod, axis=1))
            return tuple(out) if dot else acc

        init = tuple(jnp.zeros((bt,), jnp.float32) for _ in range(k)) if dot else ()
        acc = jax.lax.fori_loop(0, per, body, init)
        if dot:  # this group's share of the dot products
            for j in range(k):
                dw_ref[s, pl.ds(b * bt, bt), j] = acc[j]

    @pl.when(i >= nt * ns)
    def _():
        z = i - nt * ns
        rows = z * br + jnp.arange(br)
        src = plgpu.load(src_ref.at[pl.ds(z * br, br)], mask=rows < num_rows, other=0)
        pad = jnp.logical_and(rows < num_rows, src >= num_tokens * k)
        rows = jnp.where(pad, rows, num_rows)

        def body(c, carry):
            zeros = jnp.zeros((br, bd), out_ref.dtype)
            plgpu.store(_rows(out_ref, rows, c * bd, bd), zeros, mask=pad[:, None])
            return carry

        jax.lax.fori_loop(0, nd, body, 0)


def scatter_rows(
    x: Array,
    pos: Array,
    source: Array,
    scale: Array | None = None,
    *,
    dot_with: Array | None = None,
    out_dtype=None,
    interpret: bool = False,
    tiles: dict | None = None,
) -> Array | tuple[Array, Array]:
    """``out [P, D]`` with ``out[pos[t, j]] = scale[t, j] * x[t]`` (in float32, then
    ``out_dtype``, default x's) for ``pos[t, j] >= 0``, and zero on the padding rows
    (``source[p] >= T*k``).

    Args:
      x: ``[T, D]`` token rows.
      pos: int ``[T, k]`` padded row of each assignment, ``-1`` where not placed.
      source: int ``[P]`` source assignment of each padded row (``>= T*k`` for padding).
      scale: optional ``[T, k]`` factors (float32 products).
      dot_with: optional ``[P, D]`` rows; then also returns float32 ``dw [T, k]``,
        ``dw[t, j] = sum_d dot_with[pos[t, j], d] * x[t, d]`` (x rounded to
        ``dot_with``'s dtype; 0 where not placed).
    """
    t, d = x.shape
    k = pos.shape[1]
    _check("scatter_rows", d)
    p = source.shape[0]
    tl = {**SCATTER_TILES, **(tiles or {})}
    bt, br = tl["bt"], tl["br"]
    bd = _piece(d, tl["bd"])
    nd = d // bd
    if tl["split"] < 1:
        raise ValueError(f"scatter_rows: tiles split={tl['split']} must be at least 1")
    ns = max(g for g in range(1, min(tl["split"], nd) + 1) if nd % g == 0)  # divides nd
    pos, scale = _token_blocks(pos, scale, bt)
    nt = pos.shape[0] // bt
    dot = dot_with is not None
    kernel = functools.partial(
        _scatter_kernel, k=k, bt=bt, bd=bd, nd=nd, ns=ns, nt=nt, br=br, num_tokens=t,
        num_rows=p, weighted=scale is not None, dot=dot,
    )  # fmt: skip
    args = [pos, *([scale] if scale is not None else []), source.astype(jnp.int32), x]
    out_shape = [jax.ShapeDtypeStruct((p, d), out_dtype or x.dtype)]
    if dot:
        args.append(dot_with)
        out_shape.append(jax.ShapeDtypeStruct((ns, *pos.shape), jnp.float32))
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(nt * ns + pl.cdiv(p, br),),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=[pl.no_block_spec] * len(out_shape),
        compiler_params=plgpu.CompilerParams(num_warps=tl["num_warps"], num_stages=1),
        interpret=interpret,
        name="modjax_scatter_rows",
    )(*args)
    return (outs[0], outs[1][:, :t].sum(0)) if dot else outs[0]


def _gather_kernel(*refs, k, bt, weighted):
    it = iter(refs)
    pos_ref = next(it)
    scale_ref = next(it) if weighted else None
    yp_ref = next(it)
    out_ref = next(it)
    i = pl.program_id(0)
    bd = out_ref.shape[1]
    acc = jnp.zeros(out_ref.shape, jnp.float32)
    for j in range(k):
        p = pos_ref[pl.ds(i * bt, bt), j]
        ok = p >= 0
        rows = jnp.where(ok, p, yp_ref.shape[0])
        v = plgpu.load(_rows(yp_ref, rows, pl.program_id(1) * bd, bd), mask=ok[:, None], other=0)
        v = v.astype(jnp.float32)
        if weighted:
            v = v * scale_ref[pl.ds(i * bt, bt), j][:, None]
        acc += v
    out_ref[...] = acc.astype(out_ref.dtype)


def gather_sum(
    yp: Array,
    pos: Array,
    scale: Array | None = None,
    *,
    out_dtype=None,
    interpret: bool = False,
    tiles: dict | None = None,
) -> Array:
    """``out [T, D]``, ``out[t] = sum_j scale[t, j] * yp[pos[t, j]]`` over ``pos >= 0``
    (float32 products and sum, then ``out_dtype``, default yp's)."""
    d = yp.shape[1]
    _check("gather_sum", d)
    t = pos.shape[0]
    k = pos.shape[1]
    tl = {**GATHER_TILES, **(tiles or {})}
    bt = tl["bt"]
    bd = _piece(d, tl["bd"])
    pos, scale = _token_blocks(pos, scale, bt)
    args = [pos, *([scale] if scale is not None else []), yp]
    out = pl.pallas_call(
        functools.partial(_gather_kernel, k=k, bt=bt, weighted=scale is not None),
        out_shape=jax.ShapeDtypeStruct((pos.shape[0], d), out_dtype or yp.dtype),
        grid=(pos.shape[0] // bt, d // bd),
        in_specs=[pl.no_block_spec] * len(args),
        out_specs=pl.BlockSpec((bt, bd), lambda i, c: (i, c)),
        compiler_params=plgpu.CompilerParams(num_warps=tl["num_warps"], num_stages=1),
        interpret=interpret,
        name="modjax_gather_sum",
    )(*args)
    return out[:t]
