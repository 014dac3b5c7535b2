"""Grouped matmuls on NVIDIA Hopper through Mosaic GPU kernels (``impl="mgpu"``).

* :func:`gmm` (forward and input gradient) runs modjax's own warp-specialised block kernel,
  :mod:`modjax.kernels.mgpu_block_gmm`, where its tiles fit (128-row blocks, output width
  a multiple of 256), and jax's ``ragged_dot_mgpu.ragged_dot`` otherwise;
* :func:`tgmm` (per-group weight gradient ``x^T dy``) runs modjax's block weight-gradient
  kernel (:func:`modjax.kernels.mgpu_block_gmm.tgmm`) where its tiles fit (K a multiple
  of 128, N of 256), and jax's ``transposed_ragged_dot_mgpu.transposed_ragged_dot``
  otherwise.

jax's kernels take ragged row groups; here the groups are the layout's blocks, so every
group is a whole number of ``block_size`` rows. They compile for Hopper only (sm_90a),
bf16 or f16.

Differences from the other implementations, all handled here:

* rows past the used blocks: the block kernel writes zeros there itself; after jax's
  ragged dot, which leaves them unwritten, :func:`gmm` zeroes them with a select;
* the weight gradient's dtype: the block kernel rounds its float32 accumulators to the
  asked ``out_dtype`` in its epilogue (the layer asks for the weights' dtype);
  ``transposed_ragged_dot`` returns the operand dtype (float32 accumulation inside,
  rounded once at the end), so a float32 ``out_dtype`` from it has the operand dtype's
  precision (bf16: relative 2^-9);
* tile sizes must divide the widths; checked with an error naming the width and the tile.

Tiles are module defaults (``TILES``, ``T_TILES``, ``mgpu_block_gmm.TILES``), overridable
per call; they come from ``benchmarks/gmm_tiles.py`` on an H200 (``benchmarks/RESULTS.md``).
There jax's ``tgmm`` runs at 640-670 TFLOP/s at the issue's OLMoE and Mixtral shapes
(bf16 out), against 260-410 for the Triton-lowered Pallas ``tgmm``, so ``impl="auto"``
takes the Mosaic GPU kernels for the weight gradient on Hopper (:func:`supports_tgmm`);
the block ``tgmm`` beats jax's there, 710-750 TFLOP/s (small: 505-535 against 410-425),
so it is :data:`TGMM_KERNEL`. The block ``gmm`` runs at 430-475 TFLOP/s at
K = 512, 675-695 at OLMoE's widths and 720 at Mixtral's (Pallas: 335-345, 505-555,
590-610), so ``auto`` takes it wherever its tiles fit from K = 512 on
(:func:`prefers_gmm`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from modjax.kernels import mgpu_block_gmm
from modjax.kernels.mgpu_block_gmm import DTYPES, check_operands
from modjax.typing import Array

#: ``ragged_dot`` tiles (forward and input gradient): 128x128 output tiles over 64-wide
#: K steps, 4 stages in flight, output tiles visited in bands of 8 along N (for L2 reuse
#: of the weights: +20-40% at the OLMoE and Mixtral shapes). A band that does not divide
#: N is narrowed to the largest power of two that does.
TILES = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=8)
#: ``transposed_ragged_dot`` tiles (weight gradient: ``[K, N]`` outputs per group). Four
#: stages in flight, not two: 2x the throughput (the H200 sweep: ~270 -> ~520 TFLOP/s).
T_TILES = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=8)


def on_hopper() -> bool:
    """Whether the default device is an NVIDIA Hopper GPU (compute capability 9.x), the
    only kind these kernels compile for (``sm_90a`` wgmma)."""
    dev = jax.devices()[0]
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9")


def _runs_here(a: Array, b: Array) -> bool:
    """On a Hopper GPU, with one bf16/f16 dtype for both operands."""
    return on_hopper() and a.dtype in DTYPES and a.dtype == b.dtype


def supports_tgmm(x: Array, dy: Array, tiles=None) -> bool:
    """Whether :func:`tgmm` takes these operands (what ``impl="auto"`` asks on a GPU)."""
    t = {**T_TILES, **(tiles or {})}
    widths_fit = x.shape[1] % t["block_m"] == 0 and dy.shape[1] % t["block_n"] == 0
    return widths_fit and _runs_here(x, dy)


#: ``impl="auto"`` takes the block kernel from this contraction width on: the narrowest
#: its GPU tests and timings reach (a pipeline of at least 8 steps of 64)
GMM_MIN_K = 512


def prefers_gmm(x: Array, w: Array, transpose_rhs: bool = False) -> bool:
    """Whether ``impl="auto"`` takes :func:`gmm` for ``x [M, K]`` and weights ``w``: on
    Hopper, bf16/f16, where the block kernel's tiles fit and ``K >= GMM_MIN_K``. It beats
    the Pallas kernel at every width the H200 sweep tried (``benchmarks/gmm_tiles.py``):
    676-695 against 506-553 TFLOP/s at OLMoE's (K = 1024-2048), 431-473 against 334-344
    at K = 512."""
    n = w.shape[1] if transpose_rhs else w.shape[2]
    k = x.shape[1]
    return k >= GMM_MIN_K and mgpu_block_gmm.fits(k, n) and _runs_here(x, w)


def _band(n: int, t: dict, given) -> dict:
    """Narrow ``grid_block_n`` (if not given by the caller) to a power of two whose band
    of tiles divides N."""
    if given and "grid_block_n" in given:
        return t
    g = t["grid_block_n"]
    while g > 1 and n % (g * t["block_n"]):
        g //= 2
    return {**t, "grid_block_n": g}


def _group_rows(layout, block_size: int) -> Array:
    return ((layout.group_start[1:] - layout.group_start[:-1]) * block_size).astype(jnp.int32)


def gmm(
    x: Array,
    w: Array,
    layout,
    *,
    block_size: int,
    transpose_rhs: bool,
    tiles=None,
    kernel: str | None = None,
):
    """``out[rows of g] = x[rows of g] @ w[g]`` (``w[g].T`` with ``transpose_rhs``);
    rows of unused blocks are zero.

    ``kernel``: ``"block"`` (modjax's :mod:`~modjax.kernels.mgpu_block_gmm`, ``tiles`` a
    ``Tiles``), ``"ragged"`` (jax's ``ragged_dot_mgpu``, ``tiles`` a dict like
    :data:`TILES`), or None: the block kernel where its tiles fit (128-row blocks, N a
    multiple of 256), the ragged one otherwise.
    """
    k = x.shape[1]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    if kernel is None:
        block = block_size == mgpu_block_gmm.BLOCK_M and mgpu_block_gmm.fits(k, n)
        kernel = "block" if block else "ragged"
    if kernel == "block":
        used = layout.group_start[-1]
        return mgpu_block_gmm.gmm(x, w, layout.block_group, used, block_size=block_size,
                                  transpose_rhs=transpose_rhs, tiles=tiles)  # fmt: skip
    if kernel != "ragged":
        raise ValueError(f"kernel must be 'block', 'ragged' or None, got {kernel!r}")
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    t = _band(n, {**TILES, **(tiles or {})}, tiles)
    n_tile = t["block_n"] * t["grid_block_n"]
    check_operands(x, w, [("K (x width)", k, "block_k", t["block_k"]),
                          ("N (output width)", n, "block_n", n_tile)])  # fmt: skip
    out = ragged_dot_mgpu.ragged_dot(
        x, w, group_sizes=_group_rows(layout, block_size), transpose_rhs=transpose_rhs, **t
    )
    used = layout.group_start[-1] * block_size
    return jnp.where(jnp.arange(x.shape[0])[:, None] < used, out, jnp.zeros((), out.dtype))


#: the weight-gradient kernel :func:`tgmm` runs when not told and its tiles fit:
#: ``"block"`` (modjax's; 0.3 ms less of OLMoE's 10 ms fwd+bwd than jax's on the H200) or
#: ``"ragged"`` (jax's); a module default, like the tiles, so a benchmark can trace a whole
#: layer with either
TGMM_KERNEL = "block"


def tgmm(
    x: Array,
    dy: Array,
    layout,
    *,
    block_size: int,
    tiles=None,
    kernel: str | None = None,
    out_dtype=jnp.float32,
) -> Array:
    """Per-group ``x^T dy``, ``[G, K, N]`` in ``out_dtype`` (float32 by default).

    ``kernel``: ``"ragged"`` (jax's ``transposed_ragged_dot``, rounded to the operand dtype
    first; ``tiles`` a dict like :data:`T_TILES`), ``"block"``
    (:func:`modjax.kernels.mgpu_block_gmm.tgmm`, rounded once to ``out_dtype``; ``tiles`` a
    ``TTiles``), or None: :data:`TGMM_KERNEL` where the block kernel's tiles fit
    (:func:`~modjax.kernels.mgpu_block_gmm.tgmm_fits`), jax's otherwise or when ``tiles``
    is a dict.
    """
    if kernel is None and isinstance(tiles, dict):  # jax's kernel's tiles: jax's kernel
        kernel = "ragged"
    if kernel is None:
        fits = block_size == mgpu_block_gmm.BLOCK_M and mgpu_block_gmm.tgmm_fits(
            x.shape[1], dy.shape[1], tiles
        )
        kernel = TGMM_KERNEL if fits else "ragged"
    if kernel == "block":
        return mgpu_block_gmm.tgmm(x, dy, layout.group_start, block_size=block_size,
                                   tiles=tiles, out_dtype=out_dtype)  # fmt: skip
    if kernel != "ragged":
        raise ValueError(f"kernel must be 'ragged' or 'block', got {kernel!r}")
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu

    t = _band(dy.shape[1], {**T_TILES, **(tiles or {})}, tiles)
    check_operands(x, dy, [("K (x width)", x.shape[1], "block_m", t["block_m"]),
                   ("N (dy width)", dy.shape[1], "block_n", t["block_n"])])  # fmt: skip
    out = transposed_ragged_dot_mgpu.transposed_ragged_dot(
        x, dy, group_sizes=_group_rows(layout, block_size), **t
    )
    return out.astype(out_dtype)


__all__ = [
    "DTYPES",
    "GMM_MIN_K",
    "TGMM_KERNEL",
    "T_TILES",
    "TILES",
    "check_operands",
    "gmm",
    "on_hopper",
    "prefers_gmm",
    "supports_tgmm",
    "tgmm",
]
