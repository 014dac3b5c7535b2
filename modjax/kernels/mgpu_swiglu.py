"""A SwiGLU expert FFN's Hopper kernels on the block-padded layout (Mosaic GPU).

Two ping-pong block gmms (:mod:`modjax.kernels.mgpu_pingpong`) with the activation in
their epilogues, behind :func:`modjax.kernels.grouped_swiglu.swiglu_ffn` on a Hopper GPU:

* :func:`gmm_swiglu`: both input projections and ``h = silu(gate) * up``; each tile holds
  the same columns of both projections;
* :func:`gmm_swiglu_bwd`: ``dh = dy @ w_out.T`` and the activation's backward, each
  consumer warpgroup loading its tile's ``gate`` and ``up`` before its mainloop;
* :func:`gmm_sum_t`: the input gradient ``d gate @ w_gate.T + d up @ w_up.T`` as one
  contraction, one output instead of two and their sum.

Their reference twins are ``grouped_matmul``'s gmm and ``grouped_swiglu``'s activation
functions; ``tests/kernels/test_grouped_swiglu.py`` holds them equal on a GPU and checks
the lowering and the errors on CPU.
"""

from __future__ import annotations

import jax

from modjax.kernels.mgpu_block_gmm import (
    BLOCK_M,
    PINGPONG_TILES,
    SMEM_BYTES,
    Tiles,
    check,
    pingpong_smem,
)
from modjax.typing import Array

#: the tiling of :func:`gmm_swiglu`: ping-pong tiles of 64 ``gate`` and 64 ``up`` columns
SWIGLU_TILES = PINGPONG_TILES.replace(minor="n")
#: :func:`swiglu_fits` takes contractions up to this wide: on the H200 the fused forward
#: gained 3% of the layer's forward at K = 2048 (OLMoE: 3.61-3.66 against 3.76-3.78 ms)
#: and lost 4% at K = 4096 (Mixtral: 19.81 against 19.02), where the ping-pong schedule
#: trails the cooperative one (``benchmarks/RESULTS.md``, ninth session)
SWIGLU_MAX_K = 2048


def gmm_swiglu(
    x: Array,
    w_gate: Array,
    w_up: Array,
    block_group: Array,
    num_used: Array,
    *,
    block_size: int = BLOCK_M,
    tiles: Tiles | None = None,
) -> tuple[Array, Array, Array]:
    """A SwiGLU expert FFN's input projections and activation in one kernel.

    ``gate[b] = x[b] @ w_gate[g]`` and ``up[b] = x[b] @ w_up[g]`` for ``g =
    block_group[b]``, each rounded to x's dtype, and ``h = silu(gate) * up`` computed in
    float32 and rounded to x's dtype: what ``gmm`` twice and the activation give
    (``grouped_matmul``'s reference twin), with the activation in the epilogue
    (:func:`modjax.kernels.mgpu_pingpong.gmm_swiglu`). Rows past ``num_used`` blocks are
    zero in all three.

    Args:
      x: ``[Nb * 128, K]`` bf16/f16.
      w_gate, w_up: ``[G, K, F]``, x's dtype.
      block_group, num_used: as :func:`modjax.kernels.mgpu_block_gmm.gmm`.
      tiles: a ping-pong :class:`Tiles` (default :data:`SWIGLU_TILES`); each tile holds
        ``tile_n / 2`` columns of both projections, so F must be a multiple of that.

    Returns:
      ``(h, gate, up)``, each ``[Nb * 128, F]`` in x's dtype.
    """
    t = tiles or SWIGLU_TILES
    check_swiglu(x, w_gate, w_up, block_size, t)
    from modjax.kernels import mgpu_pingpong

    return mgpu_pingpong.gmm_swiglu(x, w_gate, w_up, block_group, num_used, t)


def check_swiglu(x: Array, w_gate: Array, w_up: Array, block_size: int, tiles: Tiles) -> None:
    """Errors naming the argument for :func:`gmm_swiglu`, before anything is traced."""
    if w_gate.shape != w_up.shape or w_gate.dtype != w_up.dtype:
        raise ValueError(
            f"w_gate and w_up must match, got {w_gate.shape} {w_gate.dtype} and "
            f"{w_up.shape} {w_up.dtype}"
        )
    if tiles.schedule != "pingpong":
        raise ValueError(f"gmm_swiglu takes a ping-pong tiling, got schedule={tiles.schedule!r}")
    f = w_gate.shape[2]
    if f % (tiles.tile_n // 2):
        raise ValueError(
            f"gmm_swiglu: F (w_gate width)={f} must be a multiple of tile_n/2={tiles.tile_n // 2}"
        )
    # the kernel is a ping-pong gmm of N = 2F output columns: its other checks
    check(x, jax.ShapeDtypeStruct((*w_gate.shape[:2], 2 * f), w_gate.dtype), block_size,
          False, tiles)  # fmt: skip


#: the tiling of :func:`gmm_swiglu_bwd`: ping-pong tiles of 64 columns (each consumer
#: also holds its tile's ``gate`` and ``up`` in shared memory)
SWIGLU_BWD_TILES = PINGPONG_TILES.replace(tile_n=64, minor="n")
#: :func:`swiglu_bwd_fits` takes contractions up to this wide: on the H200 the layer's
#: fwd+bwd took 1.060 ms with the fused backward against 1.073 without at K = 512
#: (small), and 10.46 against 10.04 at K = 2048 (OLMoE), where its 64-wide tiles trail
#: the cooperative gmm (``benchmarks/RESULTS.md``, ninth session)
SWIGLU_BWD_MAX_K = 1024


def gmm_swiglu_bwd(
    dy: Array,
    w_out: Array,
    gate: Array,
    up: Array,
    block_group: Array,
    num_used: Array,
    *,
    block_size: int = BLOCK_M,
    tiles: Tiles | None = None,
) -> tuple[Array, Array]:
    """The gradients of a SwiGLU expert FFN's projections, ``(d gate, d up)``, in one kernel.

    ``dh[b] = dy[b] @ w_out[g].T`` (rounded to dy's dtype) for ``g = block_group[b]``, then
    the activation's backward (:func:`modjax.kernels.grouped_swiglu.swiglu_grad`) in the
    epilogue (:func:`modjax.kernels.mgpu_pingpong.gmm_swiglu_bwd`): what ``gmm`` with
    ``transpose_rhs`` and ``swiglu_grad`` give. Rows past ``num_used`` blocks are zero.

    Args:
      dy: ``[Nb * 128, D]`` bf16/f16, the FFN output's cotangent in block-padded layout.
      w_out: ``[G, F, D]``, dy's dtype.
      gate, up: ``[Nb * 128, F]``, the forward's projections (:func:`gmm_swiglu`).
      tiles: a ping-pong :class:`Tiles` (default :data:`SWIGLU_BWD_TILES`).
    """
    t = tiles or SWIGLU_BWD_TILES
    check_swiglu_bwd(dy, w_out, gate, up, block_size, t)
    from modjax.kernels import mgpu_pingpong

    return mgpu_pingpong.gmm_swiglu_bwd(dy, w_out, gate, up, block_group, num_used, t)


def check_swiglu_bwd(dy, w_out, gate, up, block_size: int, tiles: Tiles) -> None:
    """Errors naming the argument for :func:`gmm_swiglu_bwd`, before anything is traced."""
    want = (dy.shape[0], w_out.shape[1])
    for name, a in (("gate", gate), ("up", up)):
        if a.shape != want or a.dtype != dy.dtype:
            raise ValueError(
                f"gmm_swiglu_bwd: {name} must be {want} {dy.dtype} (dy's rows, w_out's F), got "
                f"{a.shape} {a.dtype}"
            )
    if tiles.schedule != "pingpong":
        raise ValueError(
            f"gmm_swiglu_bwd takes a ping-pong tiling, got schedule={tiles.schedule!r}"
        )
    check(dy, w_out, block_size, True, tiles)
    smem = pingpong_smem(tiles, dy.dtype) + 2 * 2 * BLOCK_M * tiles.tile_n * dy.dtype.itemsize
    if smem > SMEM_BYTES:
        raise ValueError(
            f"gmm_swiglu_bwd with tile_n={tiles.tile_n} tile_k={tiles.tile_k} "
            f"stages={tiles.stages} needs {smem} bytes of shared memory, over {SMEM_BYTES}"
        )


#: the tiling of :func:`gmm_sum_t`
SUM_T_TILES = PINGPONG_TILES.replace(minor="n")
#: whether :func:`modjax.kernels.grouped_swiglu.swiglu_ffn` takes :func:`gmm_sum_t` for the
#: input gradient where it fits (False: one gmm per projection and their sum)
SUM_T = True


def gmm_sum_t(
    xs: tuple[Array, ...],
    ws: tuple[Array, ...],
    block_group: Array,
    num_used: Array,
    *,
    block_size: int = BLOCK_M,
    tiles: Tiles | None = None,
) -> Array:
    """``sum_i xs[i][b] @ ws[i][g].T`` for ``g = block_group[b]`` as one contraction
    (:func:`modjax.kernels.mgpu_pingpong.gmm_sum_t`): the input gradient of projections
    that share their input, one ``[M, N]`` output instead of one per projection and a sum.
    Rows past ``num_used`` blocks are zero.

    Args:
      xs: ``[Nb * 128, K]`` arrays, bf16/f16 (e.g. SwiGLU's ``d gate`` and ``d up``).
      ws: as many ``[G, N, K]`` arrays (e.g. ``w_gate`` and ``w_up``, ``[G, D, F]``).
      tiles: a ping-pong :class:`Tiles` (default :data:`SUM_T_TILES`); the whole
        contraction (``len(xs) * K``) must be whole turns of its ring.
    """
    t = tiles or SUM_T_TILES
    check_gmm_sum_t(xs, ws, block_size, t)
    from modjax.kernels import mgpu_pingpong

    return mgpu_pingpong.gmm_sum_t(xs, ws, block_group, num_used, t)


def check_gmm_sum_t(xs, ws, block_size: int, tiles: Tiles) -> None:
    """Errors naming the argument for :func:`gmm_sum_t`, before anything is traced."""
    if len(xs) != len(ws) or not xs:
        raise ValueError(f"gmm_sum_t takes as many xs as ws, got {len(xs)} and {len(ws)}")
    for name, arrays in (("xs", xs), ("ws", ws)):
        if len({(a.shape, a.dtype) for a in arrays}) != 1:
            got = [(a.shape, str(a.dtype)) for a in arrays]
            raise ValueError(f"gmm_sum_t: the {name} must share one shape and dtype, got {got}")
    if ws[0].ndim != 3 or ws[0].shape[2] != xs[0].shape[-1]:
        raise ValueError(
            f"gmm_sum_t: ws must be [G, N, K] with K = the xs' width {xs[0].shape[-1]}, got "
            f"{ws[0].shape}"
        )
    if tiles.schedule != "pingpong":
        raise ValueError(f"gmm_sum_t takes a ping-pong tiling, got schedule={tiles.schedule!r}")
    x = xs[0]  # the kernel is a ping-pong gmm over the pairs' whole contraction: its checks
    whole = jax.ShapeDtypeStruct((x.shape[0], x.shape[1] * len(xs)), x.dtype)
    check(whole, jax.ShapeDtypeStruct((*ws[0].shape[:2], whole.shape[1]), ws[0].dtype),
          block_size, True, tiles)  # fmt: skip


def sum_t_fits(k: int, n: int, parts: int = 2) -> bool:
    """Whether :func:`gmm_sum_t` (with :data:`SUM_T_TILES`) takes ``parts`` pairs of
    contraction width ``K`` each and output width ``N``."""
    t = SUM_T_TILES
    steps = parts * k // t.tile_k
    return SUM_T and k % t.tile_k == 0 and steps % (2 * t.stages) == 0 and n % t.tile_n == 0


def swiglu_fits(k: int, f: int) -> bool:
    """Whether :func:`gmm_swiglu` (with :data:`SWIGLU_TILES`) takes an FFN of width ``K`` (=
    D) and hidden width ``F``, up to :data:`SWIGLU_MAX_K` (where it is the faster path)."""
    t = SWIGLU_TILES
    return _fits(k, f, t, t.tile_n // 2) and k <= SWIGLU_MAX_K


def swiglu_bwd_fits(k: int, f: int) -> bool:
    """Whether :func:`gmm_swiglu_bwd` (with :data:`SWIGLU_BWD_TILES`) takes the backward of
    an FFN of width ``K`` (= D) and hidden width ``F``, up to :data:`SWIGLU_BWD_MAX_K`."""
    return _fits(k, f, SWIGLU_BWD_TILES, SWIGLU_BWD_TILES.tile_n) and k <= SWIGLU_BWD_MAX_K


def _fits(k: int, f: int, t: Tiles, f_multiple: int) -> bool:
    return k % t.tile_k == 0 and (k // t.tile_k) % (2 * t.stages) == 0 and f % f_multiple == 0


__all__ = [
    "SUM_T",
    "SUM_T_TILES",
    "SWIGLU_BWD_TILES",
    "SWIGLU_BWD_MAX_K",
    "SWIGLU_MAX_K",
    "SWIGLU_TILES",
    "check_gmm_sum_t",
    "check_swiglu",
    "check_swiglu_bwd",
    "gmm_sum_t",
    "gmm_swiglu",
    "gmm_swiglu_bwd",
    "sum_t_fits",
    "swiglu_bwd_fits",
    "swiglu_fits",
]
