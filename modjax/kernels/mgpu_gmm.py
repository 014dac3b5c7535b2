"""Grouped matmuls through jax's Hopper (Mosaic GPU) ragged-dot kernels.

jax ships warp-specialised wgmma/TMA kernels for ragged matmuls in
``jax.experimental.pallas.ops.gpu``: ``ragged_dot_mgpu.ragged_dot`` (``[M, K] x [G, K, N]``
with variable row groups, optionally ``[G, N, K]`` transposed) and
``transposed_ragged_dot_mgpu.transposed_ragged_dot`` (per-group ``x^T dy``). This module
adapts them to :mod:`modjax.kernels.grouped_matmul`'s block-padded layout (the groups are
the layout's blocks, so every group is a whole number of ``block_size`` rows), for
``impl="mgpu"``. They compile for NVIDIA Hopper GPUs only (sm_90a), bf16 or f16.

Differences from the other implementations, all handled here:

* rows past the used blocks are never written by the kernel; :func:`gmm` zeroes them (a
  select that XLA fuses into the consumer);
* ``transposed_ragged_dot`` returns the weight gradient in the operand dtype (float32
  accumulation inside, rounded once at the end); :func:`tgmm` casts it to float32 to
  keep :func:`~modjax.kernels.grouped_matmul.tgmm`'s contract, but its precision is the
  operand dtype's (bf16: relative 2^-9), where the Pallas and XLA paths keep float32;
* tile sizes must divide the widths: ``K % block_k == 0`` and ``N % block_n == 0`` for
  :func:`gmm`; ``K % block_m == 0`` and ``N % block_n == 0`` for :func:`tgmm`
  (``[rows, K] x [rows, N]``). Checked with an error naming the width and the tile.

Tiles are module defaults (``TILES``, ``T_TILES``), overridable per call.
"""

from __future__ import annotations

import jax.numpy as jnp

from modjax.typing import Array

#: ``ragged_dot`` tiles (forward and input gradient): 128x128 output tiles over 64-wide
#: K steps, 4 stages in flight, no N grouping.
TILES = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
#: ``transposed_ragged_dot`` tiles (weight gradient: ``[K, N]`` outputs per group).
T_TILES = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=2, grid_block_n=1)

DTYPES = (jnp.bfloat16, jnp.float16)


def _group_rows(layout, block_size: int) -> Array:
    return ((layout.group_start[1:] - layout.group_start[:-1]) * block_size).astype(jnp.int32)


def _check(x: Array, other: Array, checks: list[tuple[str, int, str, int]]) -> None:
    for name, a in (("x", x), ("w/dy", other)):
        if a.dtype not in DTYPES:
            raise ValueError(
                f"impl='mgpu' takes bfloat16 or float16 operands; {name} is {a.dtype} "
                "(use impl='pallas' or 'xla' for float32)"
            )
    if x.dtype != other.dtype:
        raise ValueError(f"impl='mgpu' needs one operand dtype, got {x.dtype} and {other.dtype}")
    for what, width, tile, size in checks:
        if width % size:
            raise ValueError(
                f"impl='mgpu': {what}={width} must be a multiple of the tile {tile}={size}"
            )


def gmm(x: Array, w: Array, layout, *, block_size: int, transpose_rhs: bool, tiles=None):
    """``out[rows of g] = x[rows of g] @ w[g]`` (``w[g].T`` with ``transpose_rhs``);
    rows of unused blocks are zero."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    t = {**TILES, **(tiles or {})}
    k = x.shape[1]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    n_tile = t["block_n"] * t["grid_block_n"]
    _check(x, w, [("K (x width)", k, "block_k", t["block_k"]),
                  ("N (output width)", n, "block_n", n_tile)])  # fmt: skip
    out = ragged_dot_mgpu.ragged_dot(
        x, w, group_sizes=_group_rows(layout, block_size), transpose_rhs=transpose_rhs, **t
    )
    used = layout.group_start[-1] * block_size
    return jnp.where(jnp.arange(x.shape[0])[:, None] < used, out, jnp.zeros((), out.dtype))


def tgmm(x: Array, dy: Array, layout, *, block_size: int, tiles=None) -> Array:
    """Per-group ``x^T dy``, float32 ``[G, K, N]`` (rounded to the operand dtype first)."""
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    t = {**T_TILES, **(tiles or {})}
    _check(x, dy, [("K (x width)", x.shape[1], "block_m", t["block_m"]),
                   ("N (dy width)", dy.shape[1], "block_n", t["block_n"])])  # fmt: skip
    out = transposed_ragged_dot_mgpu.transposed_ragged_dot(
        x, dy, group_sizes=_group_rows(layout, block_size), **t
    )
    return out.astype(jnp.float32)


__all__ = ["DTYPES", "T_TILES", "TILES", "gmm", "tgmm"]
