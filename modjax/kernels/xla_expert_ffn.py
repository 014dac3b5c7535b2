"""The whole expert FFN over the block-padded layout as one XLA loop (the CPU path).

:func:`expert_ffn` computes, for every used block ``b`` of
:mod:`modjax.kernels.grouped_matmul`'s layout (group ``g`` of ``b``),

    ``y[b] = hidden(x[b] @ w_in[0][g], x[b] @ w_in[1][g], ...) @ w_out[g]``

and zeros for the rows of unused blocks. It is what
:func:`modjax.computation.ffn.expert_ffn_blocks` computes with three grouped matmuls and
an activation in between, arranged differently for XLA:CPU:

* one ``fori_loop`` over *segments*: runs of up to :data:`SEGMENT_ROWS` rows (whole blocks) of
  one group (a group's rows are contiguous in the layout). A segment is plain 2-D dots
  over all its rows (XLA:CPU runs a batched matmul over blocks at half the rate of the
  same FLOPs as one dot, and small dots pay a fixed cost per call); a ``lax.switch`` has
  a branch per segment size, each returning a whole segment's worth of rows (zeros
  past its own) that the loop writes in order, so the next segment overwrites the excess;
* the activation runs on the used rows only, not on the padded ``[Nb * bs, F]`` buffers
  between grouped matmuls (on the issue's CPU shapes a quarter of those rows are padding,
  and SwiGLU's ``exp`` and divide over them cost about as much as a matmul);
* a ``jax.custom_vjp``: the forward saves the input projections; the backward is a second
  loop over the segments that recomputes the activation, takes its gradient with
  ``jax.vjp`` (any activation), and accumulates the weight gradients in the loop carry.

Only the loop carry is updated in place: results leave the ``lax.switch`` and are
written outside it. Passed through the branches, the carry was copied on every step
(20x slower on the CPU shapes).

The reference twin is the grouped-matmul composition (``expert_ffn_blocks`` with
``impl="reference"``); ``tests/kernels/test_xla_expert_ffn.py`` holds values and gradients
equal on random inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from modjax.kernels.grouped_matmul import SUPPORTED_DTYPES
from modjax.typing import Array

#: most rows of one group multiplied as one dot: a segment is up to
#: ``SEGMENT_ROWS // block_size`` blocks (a ``lax.switch`` branch per size, at most
#: ``MAX_BRANCHES``)
SEGMENT_ROWS = 512
MAX_BRANCHES = 16


def _seg(nb: int, bs: int) -> int:
    return max(1, min(SEGMENT_ROWS // bs, MAX_BRANCHES, nb))


def expert_ffn(
    x: Array,
    w_in: tuple[Array, ...],
    w_out: Array,
    group_start: Array,
    hidden: Callable[[tuple[Array, ...]], Array],
    *,
    block_size: int,
) -> Array:
    """``[Nb * bs, D] -> [Nb * bs, D]``: each used block through its group's FFN.

    Args:
      x: block-padded rows, ``[Nb * block_size, D]``.
      w_in: input projections, each ``[G, D, F]`` in ``x.dtype``.
      w_out: ``[G, F, D]`` in ``x.dtype``.
      group_start: int ``[G + 1]``, the layout's first block of each group (blocks from
        ``group_start[G]`` on are padding: zero rows out).
      hidden: ``(proj_0, proj_1, ...) -> h``, elementwise (``[n, F]`` each -> ``[n, F]``);
        a static, hashable callable.
      block_size: rows per block.
    """
    for name, a in (("x", x), ("w_out", w_out), *((f"w_in[{i}]", w) for i, w in enumerate(w_in))):
        if a.dtype not in SUPPORTED_DTYPES or a.dtype != x.dtype:
            raise ValueError(
                f"{name} dtype must be one of float32/bfloat16/float16 and x's ({x.dtype}), "
                f"got {a.dtype}"
            )
    if x.shape[0] % block_size:
        raise ValueError(f"x has {x.shape[0]} rows, not a whole number of {block_size}-row blocks")
    return _ffn(x, tuple(w_in), w_out, group_start, hidden, block_size)


def _dot(a, b, dtype):
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype)


def _segments(group_start: Array, nb: int, seg: int):
    """Runs of up to ``seg`` consecutive blocks of one group, covering the used blocks in
    order: ``(group, first_block, num_blocks)`` each ``[nb]`` (entries past ``count`` are
    filler) and ``count``."""
    num_groups = group_start.shape[0] - 1
    blocks = group_start[1:] - group_start[:-1]
    runs = (blocks + seg - 1) // seg
    ends = jnp.cumsum(runs)
    i = jnp.arange(nb, dtype=jnp.int32)
    group = jnp.minimum(
        jnp.searchsorted(ends, i, side="right", method="compare_all"), num_groups - 1
    )
    j = i - (ends[group] - runs[group])
    size = jnp.clip(blocks[group] - j * seg, 1, seg)
    return group.astype(jnp.int32), (group_start[group] + j * seg).astype(jnp.int32), size, ends[-1]


def _over_segments(group_start, nb, bs, compute, update, init):
    """``fori_loop`` over the segments: ``compute(size, group, row)`` with a static
    ``size`` in blocks (one ``lax.switch`` branch per size) returns same-shaped results for
    every size, which ``update(group, row, results, carry)`` folds into the carry outside
    the switch (a carry passed through the branches would be copied every step)."""
    seg = _seg(nb, bs)
    group, first, size, count = _segments(group_start, nb, seg)

    def step(i, carry):
        branches = [functools.partial(compute, s) for s in range(1, seg + 1)]
        g, row = group[i], first[i] * bs
        return update(g, row, lax.switch(size[i] - 1, branches, g, row), carry)

    return lax.fori_loop(0, count, step, init)


def _rows(a, row, n):
    return lax.dynamic_slice_in_dim(a, row, n, 0)


def _pad_rows(a, rows):
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, 0)))


def _forward(x, w_in, w_out, group_start, hidden, bs, nb):
    dtype, d, f = x.dtype, x.shape[1], w_out.shape[1]
    seg = _seg(nb, bs)
    spare = (nb + seg - 1) * bs  # whole-segment writes past the last used block land here

    def compute(size, g, row):
        xs = _rows(x, row, size * bs)
        proj = tuple(_dot(xs, w[g], dtype) for w in w_in)
        y = _dot(hidden(proj), w_out[g], dtype)
        # every size returns seg * bs rows (zeros past its own): the next segment, or the
        # spare rows, overwrite the excess
        return _pad_rows(y, seg * bs), tuple(_pad_rows(p, seg * bs) for p in proj)

    def update(g, row, results, carry):
        return jax.tree.map(lambda buf, r: lax.dynamic_update_slice_in_dim(buf, r, row, 0),
                            carry, results)  # fmt: skip

    init = (jnp.zeros_like(x, shape=(spare, d)), tuple(jnp.zeros_like(x, shape=(spare, f))
                                                       for _ in w_in))  # fmt: skip
    y, proj = _over_segments(group_start, nb, bs, compute, update, init)
    return y[: nb * bs], proj


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ffn(x, w_in, w_out, group_start, hidden, bs):
    return _forward(x, w_in, w_out, group_start, hidden, bs, x.shape[0] // bs)[0]


def _ffn_fwd(x, w_in, w_out, group_start, hidden, bs):
    y, proj = _forward(x, w_in, w_out, group_start, hidden, bs, x.shape[0] // bs)
    return y, (x, w_in, w_out, group_start, proj)


def _ffn_bwd(hidden, bs, res, dy):
    x, w_in, w_out, group_start, proj = res
    dtype, nb = x.dtype, x.shape[0] // bs
    dy = dy.astype(dtype)
    seg = _seg(nb, bs)
    f32_dot = functools.partial(jnp.dot, preferred_element_type=jnp.float32)

    def compute(size, g, row):
        n = size * bs
        xs, dys = _rows(x, row, n), _rows(dy, row, n)
        h, act_vjp = jax.vjp(hidden, tuple(_rows(p, row, n) for p in proj))
        (dp,) = act_vjp(_dot(dys, w_out[g].T, dtype))
        dxs = sum(f32_dot(d, w[g].T) for d, w in zip(dp, w_in)).astype(dtype)
        return _pad_rows(dxs, seg * bs), tuple(f32_dot(xs.T, d) for d in dp), f32_dot(h.T, dys)

    def update(g, row, results, carry):
        dxs, dw_in_g, dw_out_g = results
        dx, dw_in, dw_out = carry
        dw_in = tuple(acc.at[g].add(u) for acc, u in zip(dw_in, dw_in_g))
        return lax.dynamic_update_slice_in_dim(dx, dxs, row, 0), dw_in, dw_out.at[g].add(dw_out_g)

    zeros = lambda w: jnp.zeros_like(w, dtype=jnp.float32)
    init = (jnp.zeros_like(x, shape=((nb + seg - 1) * bs, x.shape[1])),
            tuple(zeros(w) for w in w_in), zeros(w_out))  # fmt: skip
    dx, dw_in, dw_out = _over_segments(group_start, nb, bs, compute, update, init)
    dw_in = tuple(d.astype(w.dtype) for d, w in zip(dw_in, w_in))
    return dx[: nb * bs], dw_in, dw_out.astype(w_out.dtype), None


_ffn.defvjp(_ffn_fwd, _ffn_bwd)

__all__ = ["MAX_BRANCHES", "SEGMENT_ROWS", "expert_ffn"]
