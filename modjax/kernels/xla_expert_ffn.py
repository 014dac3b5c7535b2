"""A whole expert FFN per block of the block-padded layout, as one XLA loop (the CPU path).

:func:`expert_ffn` computes, for every used block ``b`` of
:mod:`modjax.kernels.grouped_matmul`'s layout (group ``g = block_group[b]``),

    ``y[b] = hidden(x[b] @ w_in[0][g], x[b] @ w_in[1][g], ...) @ w_out[g]``

and zeros for the rows of unused blocks. It is what
:func:`modjax.computation.ffn.expert_ffn_blocks` computes with three grouped matmuls and
an activation in between, fused differently for XLA:CPU:

* one ``lax.scan`` over blocks does the whole FFN of a block: the activation runs on the
  used blocks' rows only, not on the padded ``[Nb * bs, F]`` buffers between grouped
  matmuls (on the issue's CPU shapes a quarter of those rows are padding, and the
  SwiGLU's ``exp`` and divide over them cost as much as a matmul);
* each block is plain 2-D dots (XLA:CPU runs a batched matmul over blocks at half the
  rate of the same FLOPs as one dot, ``benchmarks/RESULTS.md``);
* the scan stacks its per-block outputs, so no output buffer is zero-filled first;
  unused blocks take a ``lax.cond`` branch that writes zeros;
* a ``jax.custom_vjp``: the forward saves the input projections; the backward is a loop
  over the used blocks that recomputes the activation, takes its gradient with
  ``jax.vjp`` (any activation), and accumulates the weight gradients in its carry.

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

#: blocks per unrolled scan step (fewer loop iterations; 2-4 measured alike on 2 cores)
UNROLL = 4


def expert_ffn(
    x: Array,
    w_in: tuple[Array, ...],
    w_out: Array,
    block_group: Array,
    num_used: Array,
    hidden: Callable[[tuple[Array, ...]], Array],
    *,
    block_size: int,
) -> Array:
    """``[Nb * bs, D] -> [Nb * bs, D]``: each used block through its group's FFN.

    Args:
      x: block-padded rows, ``[Nb * block_size, D]``.
      w_in: input projections, each ``[G, D, F]`` in ``x.dtype``.
      w_out: ``[G, F, D]`` in ``x.dtype``.
      block_group: int ``[Nb]`` group of each block.
      num_used: int scalar, blocks past it are padding (zero rows out).
      hidden: ``(proj_0, proj_1, ...) -> h``, elementwise (``[bs, F]`` each -> ``[bs, F]``);
        a static, hashable callable.
      block_size: rows per block.
    """
    for name, a in (("x", x), ("w_out", w_out), *((f"w_in[{i}]", w) for i, w in enumerate(w_in))):
        if a.dtype not in SUPPORTED_DTYPES or a.dtype != x.dtype:
            raise ValueError(
                f"{name} dtype must be one of float32/bfloat16/float16 and x's ({x.dtype}), "
                f"got {a.dtype}"
            )
    nb = block_group.shape[0]
    if x.shape[0] != nb * block_size:
        raise ValueError(f"x has {x.shape[0]} rows, the layout {nb} * {block_size}")
    return _ffn(x, tuple(w_in), w_out, block_group, num_used, hidden, block_size)


def _dot(a, b, dtype):
    return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype)


def _forward(x, w_in, w_out, block_group, num_used, hidden, bs):
    nb, dtype = block_group.shape[0], x.dtype
    f = w_out.shape[1]
    xb = x.reshape(nb, bs, x.shape[1])

    def block(b):
        g = block_group[b]
        proj = tuple(_dot(xb[b], w[g], dtype) for w in w_in)
        return _dot(hidden(proj), w_out[g], dtype), proj

    def padding(b):
        del b
        return jnp.zeros_like(x, shape=(bs, x.shape[1])), tuple(
            jnp.zeros_like(x, shape=(bs, f)) for _ in w_in
        )

    def step(carry, b):
        return carry, lax.cond(b < num_used, block, padding, b)

    _, (y, proj) = lax.scan(step, None, jnp.arange(nb), unroll=min(UNROLL, nb))
    return y.reshape(nb * bs, -1), proj


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _ffn(x, w_in, w_out, block_group, num_used, hidden, bs):
    return _forward(x, w_in, w_out, block_group, num_used, hidden, bs)[0]


def _ffn_fwd(x, w_in, w_out, block_group, num_used, hidden, bs):
    y, proj = _forward(x, w_in, w_out, block_group, num_used, hidden, bs)
    return y, (x, w_in, w_out, block_group, num_used, proj)


def _ffn_bwd(hidden, bs, res, dy):
    x, w_in, w_out, block_group, num_used, proj = res
    nb, dtype = block_group.shape[0], x.dtype
    xb = x.reshape(nb, bs, x.shape[1])
    dyb = dy.astype(dtype).reshape(nb, bs, dy.shape[1])

    def block(b, carry):
        dx, dw_in, dw_out = carry
        g = block_group[b]
        p = tuple(pr[b] for pr in proj)
        h, act_vjp = jax.vjp(hidden, p)
        dw_out = dw_out.at[g].add(jnp.dot(h.T, dyb[b], preferred_element_type=jnp.float32))
        (dp,) = act_vjp(_dot(dyb[b], w_out[g].T, dtype))
        dxb = sum(jnp.dot(d, w[g].T, preferred_element_type=jnp.float32) for d, w in zip(dp, w_in))
        dw_in = tuple(
            acc.at[g].add(jnp.dot(xb[b].T, d, preferred_element_type=jnp.float32))
            for acc, d in zip(dw_in, dp)
        )
        return lax.dynamic_update_index_in_dim(dx, dxb.astype(dtype), b, 0), dw_in, dw_out

    # a loop over the used blocks only, everything in its carry, updated in place (a
    # lax.cond per block, as in the forward, would pass the weight gradients through
    # the branches)
    zeros = lambda w: jnp.zeros_like(w, dtype=jnp.float32)
    init = (jnp.zeros_like(xb), tuple(zeros(w) for w in w_in), zeros(w_out))
    dx, dw_in, dw_out = lax.fori_loop(0, num_used, block, init)
    dw_in = tuple(d.astype(w.dtype) for d, w in zip(dw_in, w_in))
    return dx.reshape(nb * bs, -1), dw_in, dw_out.astype(w_out.dtype), None, None


_ffn.defvjp(_ffn_fwd, _ffn_bwd)

__all__ = ["UNROLL", "expert_ffn"]
