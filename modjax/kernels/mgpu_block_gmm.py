"""modjax's own Hopper grouped matmul for the block-padded layout (Mosaic GPU).

:func:`gmm` computes ``out[b] = x[b] @ w[group(b)]`` (or ``@ w[group(b)].T``) for every
used block ``b`` of :mod:`modjax.kernels.grouped_matmul`'s block-padded layout. Because
every block of ``block_size`` (= 128) rows belongs to one group, the kernel is a plain
tiled matmul whose right operand is picked per row block; no ragged tile boundaries, no
masked stores. Its shape:

* persistent: one program per SM walks the output tiles of the *used* blocks only (the
  loop's trip count is read from the layout at run time, so padding blocks cost nothing);
  tiles are visited in bands along one dimension for L2 reuse;
* warp-specialised: a producer warpgroup streams ``x`` and weight tiles into shared memory
  with TMA, ``stages`` deep; two consumer warpgroups each own half of a ``128 x 2*tile_n``
  output tile and run ``wgmma`` into float32 registers;
* the epilogue rounds to the operand dtype and stores through shared memory with TMA in
  ``epi x epi`` pieces, double-buffered.

That is the cooperative schedule. Short contractions (``K <= 1024`` and ``K / 64`` a
multiple of 8, :func:`default_tiles`) take a ping-pong one instead
(``Tiles(schedule="pingpong")``, :mod:`modjax.kernels.mgpu_pingpong`): each consumer
warpgroup computes whole ``128 x tile_n`` tiles, in strict turns over one shared ring of
operand slots, so one's epilogue runs beside the other's mainloop.

Rows of unused blocks (past ``num_used``) are zero (the contract of
:func:`modjax.kernels.grouped_matmul.gmm`): after their tiles, the consumer warpgroups store
zero tiles over them, so no pass over the whole output is needed afterwards.

Why not jax's ``ragged_dot_mgpu``: it handles groups that start mid-tile, with one
warpgroup and no producer/consumer split; on the H200 it reached 380-480 TFLOP/s at the
OLMoE widths, below the Triton-lowered Pallas kernel (``benchmarks/RESULTS.md``). The
block layout lets this kernel take the structure of a dense Hopper matmul instead.

:func:`tgmm`, the per-group weight gradient ``x^T dy``, has the same structure over the
``[K, N]`` tiles of every group; on the H200 it runs at 710-750 TFLOP/s at the OLMoE and
Mixtral widths (jax's ``transposed_ragged_dot``: 640-670), and it is the default weight
gradient of ``impl="mgpu"`` (``mgpu_gmm.TGMM_KERNEL``).

Compiles for NVIDIA Hopper (sm_90a) only, bf16/f16. The reference twin is
``grouped_matmul._gmm_reference``; ``tests/kernels/test_mgpu_block_gmm.py`` holds them
equal on a GPU (and, through ``impl="mgpu"`` with gradients, ``test_mgpu_gmm.py``) and
checks the lowering and the errors on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from modjax.typing import Array

#: operand dtypes of the Mosaic GPU kernels (``wgmma`` on 16-bit floats)
DTYPES = (jnp.bfloat16, jnp.float16)
#: rows per block this kernel takes (one consumer warpgroup's wgmma tile height)
BLOCK_M = 128
#: shared memory a Hopper CTA may take (227 KiB), less a little for the barriers
SMEM_BYTES = 227 * 1024 - 1024
#: profiled spans per warpgroup with ``profile_dir`` (3 per tile: keep a profiled call's
#: tiles per SM under a third of this; 16 bytes of shared memory each, which the default
#: 4-stage tiling has to spare)
PROFILE_SPANS = 48


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tiling of :func:`gmm`.

    Attributes:
      tile_n: output columns per consumer warpgroup (the CTA's tile is ``128 x 2*tile_n``).
      tile_k: contraction step per pipeline stage.
      stages: pipeline stages in flight (shared memory: ``stages * (128 + 2*tile_n) *
        tile_k * 2`` bytes, plus the epilogue's).
      band: output tiles are visited in bands of this many along ``minor``.
      minor: ``"n"`` or ``"m"``: the dimension the bands run along.
      epi: side of the square epilogue pieces (``epi = tile_n = 128``: one piece per
        warpgroup, stored from a single buffer).
      wait: ``wgmma`` groups left in flight at the end of a step (1: the next step's
        ``wgmma`` is issued before this one's finishes; its input slots are released a
        step later).
      chain: run the per-tile pipelines of a program as one pipeline of pipelines (the
        producer fetches the next tile's first stages while the consumers finish this
        one's last steps and its epilogue). Needs ``K / tile_k`` divisible by ``stages``
        and ``wait=0``.
      cluster: 1, or 2: CTAs run in clusters of two that take adjacent column tiles of
        one row block and share its ``x`` tiles, each loading half of every tile and
        multicasting it to both (TMA multicast; the weights' tiles differ). Needs N a
        multiple of ``4*tile_n`` and ``chain=False``. On the H200 it matches the
        reference but is no faster (OLMoE up 696 against 693 TFLOP/s chained, down 670
        against 686; the layer 1-3% slower), so no default takes it: operand traffic
        does not limit this kernel (``benchmarks/RESULTS.md``).
      schedule: ``"cooperative"``: the two consumer warpgroups share each ``128 x
        2*tile_n`` tile; or ``"pingpong"``: each takes whole ``128 x tile_n`` tiles in
        turn, so one's epilogue overlaps the other's mainloop
        (:func:`modjax.kernels.mgpu_pingpong.pingpong`: one ring of ``stages`` slots,
        ``K / tile_k`` a multiple of ``2 * stages``; ``wait`` 0 or 1, ``chain`` does not
        apply, ``cluster`` must be 1; N a multiple of ``tile_n``).

    On the H200 neither ``wait=1`` nor the one-piece epilogue moved the short
    contractions (K=512-1024) by more than the noise, in either direction; chaining
    gained 1-8% there (:func:`default_tiles`, ``benchmarks/RESULTS.md``).
    """

    tile_n: int = 128
    tile_k: int = 64
    stages: int = 4
    band: int = 8
    minor: str = "n"
    epi: int = 64
    wait: int = 0
    chain: bool = False
    cluster: int = 1
    schedule: str = "cooperative"

    def replace(self, **kw) -> Tiles:
        return dataclasses.replace(self, **kw)


#: defaults from the H200 sweep (``benchmarks/gmm_tiles.py --impls block``): bands of 8
#: along M won at the Mixtral widths (+1-3% over N); 4 stages over 3 by 0-3%.
TILES = Tiles(minor="m")
#: contractions up to this wide take :data:`SHORT_K_SCHEDULE` (:func:`default_tiles`)
CHAIN_MAX_K = 1024
#: the ping-pong tiling of short contractions: one shared ring of 4 slots, mainloops in
#: strict turns, one ``wgmma`` group left in flight
PINGPONG_TILES = Tiles(schedule="pingpong", stages=4, wait=1, minor="m")
#: ``"pingpong"`` (:data:`PINGPONG_TILES`) or ``"cooperative"`` (chained pipelines): what
#: short contractions take
SHORT_K_SCHEDULE = "pingpong"


def default_tiles(k: int) -> Tiles:
    """The tiling :func:`gmm` takes for contraction width ``k`` when given none.

    Up to :data:`CHAIN_MAX_K`, where a tile's epilogue and pipeline fill are a large share
    of its time: :data:`PINGPONG_TILES` (one consumer's epilogue beside the other's
    mainloop) where ``K / 64`` is a multiple of 8 (its shared ring's condition), else
    :data:`TILES` with chained pipelines (bands along N). Wider: :data:`TILES`.

    On the H200 chaining gained 8% at K = 512, 1-2% at 1024 and lost 1% at 2048. Over
    chaining, the ping-pong kernel then gained 3-13% at K = 512 and lost ~1% at 1024; the
    layer's fwd+bwd gained 1.6-3% at the small shape and 0-2% at OLMoE's
    (``benchmarks/RESULTS.md``).
    """
    pp = PINGPONG_TILES
    if SHORT_K_SCHEDULE == "pingpong" and k <= CHAIN_MAX_K:
        if (k // pp.tile_k) % (2 * pp.stages) == 0:
            return pp
    chained = TILES.replace(chain=True, minor="n")
    if k <= CHAIN_MAX_K and (k // chained.tile_k) % chained.stages == 0:
        return chained
    return TILES


def fits(k: int, n: int, tiles: Tiles | None = None) -> bool:
    """Whether widths ``K`` (contraction) and ``N`` (output) fit the tiles."""
    t = tiles or TILES
    return k % t.tile_k == 0 and n % _n_multiple(t) == 0


def _n_multiple(t: Tiles) -> int:
    return t.tile_n if t.schedule == "pingpong" else 2 * t.tile_n * t.cluster


def tgmm_fits(k: int, n: int, tiles: TTiles | None = None) -> bool:
    """Whether :func:`tgmm` takes widths ``K`` (of x) and ``N`` (of dy) with ``tiles``."""
    t = tiles or T_TILES
    return k % BLOCK_M == 0 and n % (2 * t.tile_n) == 0


def pingpong_smem(t: Tiles, dtype) -> int:
    """Shared memory of the ping-pong schedule: a ring of ``stages`` operand slots and two
    epilogue buffers per consumer warpgroup."""
    itemsize = jnp.dtype(dtype).itemsize
    ring = t.stages * (BLOCK_M + t.tile_n) * t.tile_k * itemsize
    slots = min(2, (BLOCK_M // t.epi) * (t.tile_n // t.epi))
    return ring + 2 * slots * t.epi**2 * itemsize


def swizzled(minor_elems: int, itemsize: int) -> tuple:
    """Shared-memory transforms of a tile whose minor dimension is ``minor_elems`` wide:
    8-row tiles, swizzled by the widest swizzle that row fits (what TMA and ``wgmma``
    take)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    swizzle = plgpu.find_swizzle(minor_elems * itemsize * 8)
    return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def num_sms() -> int:
    return int(jax.devices()[0].core_count)


def check_operands(x: Array, other: Array, checks: list[tuple[str, int, str, int]]) -> None:
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


def check(x: Array, w: Array, block_size: int, transpose_rhs: bool, tiles: Tiles) -> None:
    """Errors naming the argument, before anything is traced into a kernel."""
    if block_size != BLOCK_M:
        raise ValueError(f"the Mosaic GPU block gmm needs block_size={BLOCK_M}, got {block_size}")
    if tiles.minor not in ("n", "m"):
        raise ValueError(f"tiles.minor must be 'n' or 'm', got {tiles.minor!r}")
    if tiles.schedule not in ("cooperative", "pingpong"):
        raise ValueError(
            f"tiles.schedule must be 'cooperative' or 'pingpong', got {tiles.schedule!r}"
        )
    pingpong = tiles.schedule == "pingpong"
    if pingpong and (tiles.cluster != 1 or tiles.wait not in (0, 1)):
        raise ValueError(
            f"tiles.schedule='pingpong' needs cluster=1 and wait 0 or 1, got "
            f"cluster={tiles.cluster} wait={tiles.wait}"
        )
    if tiles.cluster not in (1, 2) or (tiles.cluster == 2 and tiles.chain):
        raise ValueError(
            f"tiles.cluster must be 1 or 2 (2 with chain=False), got cluster={tiles.cluster} "
            f"chain={tiles.chain}"
        )
    k = x.shape[1]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    check_operands(
        x,
        w,
        [("K (x width)", k, "tile_k", tiles.tile_k),
         ("N (output width)", n, "tile_n" if pingpong else "2*tile_n*cluster",
          _n_multiple(tiles))],
    )  # fmt: skip
    if pingpong and (k // tiles.tile_k) % (2 * tiles.stages):
        raise ValueError(
            f"tiles.schedule='pingpong' needs K/tile_k = {k // tiles.tile_k} a multiple of "
            f"2*stages = {2 * tiles.stages}"
        )
    if pingpong and (smem := pingpong_smem(tiles, x.dtype)) > SMEM_BYTES:
        raise ValueError(
            f"tiles.schedule='pingpong' with tile_n={tiles.tile_n} tile_k={tiles.tile_k} "
            f"stages={tiles.stages} needs {smem} bytes of shared memory, over {SMEM_BYTES}"
        )
    if not pingpong and tiles.chain and ((k // tiles.tile_k) % tiles.stages or tiles.wait):
        raise ValueError(
            f"tiles.chain needs K/tile_k = {k // tiles.tile_k} divisible by "
            f"stages={tiles.stages} and wait=0 (got wait={tiles.wait})"
        )
    if tiles.tile_n % tiles.epi or BLOCK_M % tiles.epi:
        raise ValueError(f"tiles.epi={tiles.epi} must divide tile_n={tiles.tile_n} and 128")


def gmm(
    x: Array,
    w: Array,
    block_group: Array,
    num_used: Array,
    *,
    block_size: int = BLOCK_M,
    transpose_rhs: bool = False,
    tiles: Tiles | None = None,
    profile_dir: str | None = None,
    interpret: bool = False,
) -> Array:
    """``out[b] = x[b] @ w[block_group[b]]`` for the first ``num_used`` blocks of 128 rows.

    Args:
      x: ``[Nb * 128, K]`` bf16/f16.
      w: ``[G, K, N]`` (``[G, N, K]`` with ``transpose_rhs``), x's dtype.
      block_group: int32 ``[Nb]``: each block's group.
      num_used: int32 scalar: blocks past it are padding (not computed; zero in the result).
      transpose_rhs: multiply by ``w[g].T``.
      tiles: :class:`Tiles` (default: :func:`default_tiles` of K).
      profile_dir: a diagnostic: record each warpgroup's ``tile``, ``mainloop`` and
        ``epilogue`` spans with Mosaic GPU's on-device profiler (:data:`PROFILE_SPANS`
        per warpgroup, in shared memory) and write a Chrome trace per call to this
        directory (``benchmarks/block_gmm_profile.py`` reads it).
      interpret: run the kernel in jax's Mosaic GPU interpreter (any backend; for tests),
        in :data:`INTERPRET_PROGRAMS` programs. That interpreter (jax 0.10) takes the
        cooperative schedule without transposed operands or clusters only (see
        :func:`check_interpret`).
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    t = tiles or default_tiles(x.shape[1])
    check(x, w, block_size, transpose_rhs, t)
    if interpret:
        check_interpret(t, transpose_rhs, profile_dir)
    if t.schedule == "pingpong":
        if profile_dir:
            raise ValueError("profile_dir is for the cooperative schedule only")
        from modjax.kernels import mgpu_pingpong

        return mgpu_pingpong.gmm(x, w, block_group, num_used, transpose_rhs, t)
    m, k = x.shape
    n = w.shape[1] if transpose_rhs else w.shape[2]
    dtype = x.dtype
    cta_n = 2 * t.tile_n
    clustered = t.cluster > 1
    # tiles are visited per cluster: n_iters column tiles of cluster * cta_n columns
    n_iters, k_iters = n // (cta_n * t.cluster), k // t.tile_k
    num_blocks = m // BLOCK_M
    itemsize = jnp.dtype(dtype).itemsize

    in_transforms = swizzled(t.tile_k, itemsize)
    w_transforms = in_transforms if transpose_rhs else swizzled(cta_n, itemsize)
    out_transforms = swizzled(t.epi, itemsize)
    spec = functools.partial(plgpu.BlockSpec, memory_space=plgpu.SMEM, delay_release=t.wait)
    x_spec = spec((BLOCK_M, t.tile_k), lambda kk: (0, kk), transforms=in_transforms,
                  collective_axes=("cluster",) if clustered else ())  # fmt: skip
    if transpose_rhs:  # w[g] is [N, K]: stream [cta_n, tile_k] tiles, transpose in wgmma
        w_spec = spec((cta_n, t.tile_k), lambda kk: (0, kk), transforms=w_transforms)
    else:
        w_spec = spec((t.tile_k, cta_n), lambda kk: (kk, 0), transforms=w_transforms)
    pieces_n = t.tile_n // t.epi
    slots = min(2, pieces_n * (BLOCK_M // t.epi))
    minor = 1 if t.minor == "n" else 0

    def body(group_gmem, used_gmem, x_gmem, w_gmem, out_gmem):
        wg = lax.axis_index("wg")
        wg_cols = pl.ds(wg * t.tile_n, t.tile_n)
        cta = lax.axis_index("cluster") if clustered else 0

        def columns(ni):  # this CTA's cta_n columns of cluster column tile ni
            return pl.ds((ni * t.cluster + cta) * cta_n, cta_n)

        def pipeline(mma, context, state=None):
            return plgpu.emit_pipeline_warp_specialized(
                mma,
                grid=(k_iters,),
                memory_registers=40,
                in_specs=[x_spec, w_spec],
                wg_axis="wg",
                num_compute_wgs=2,
                max_concurrent_steps=t.stages,
                compute_context=context,
                pipeline_state=state,
            )

        def noop(*_, **__):
            return None

        @functools.partial(
            pl.run_scoped,
            allocs=pipeline(noop, noop).get_allocations(x_gmem, w_gmem.at[0]),
            out_smem=plgpu.SMEM((2, slots, t.epi, t.epi), dtype, transforms=out_transforms),
            collective_axes="wg",
        )
        def _scope(allocs, out_smem):
            used = used_gmem[0]

            def store(out, rows, cols):
                """This warpgroup's half of a ``128 x cta_n`` output tile."""
                dst = out_gmem.at[rows, cols].at[:, wg_cols]
                store_pieces(out, dst, out_smem.at[wg], t.epi, slots)

            @plgpu.nd_loop((used * n_iters,), collective_axes="sm")
            def _tiles(info):
                mi, ni = plgpu.planar_snake(info.index[0], (used, n_iters), minor, t.band)
                rows = pl.ds(mi * BLOCK_M, BLOCK_M)
                cols = columns(ni)
                w_g = w_gmem.at[group_gmem[mi]]

                def context(run):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((BLOCK_M, t.tile_n)))
                    def _acc(acc):
                        with jax.named_scope("mainloop"):
                            run(acc)
                        with jax.named_scope("epilogue"):
                            store(acc[...].astype(dtype), rows, cols)

                def mma(_, x_smem, w_smem, acc):
                    if transpose_rhs:
                        rhs = w_smem.at[wg_cols, :].transpose((1, 0))
                    else:
                        rhs = w_smem.at[:, wg_cols]
                    plgpu.wgmma(acc, x_smem, rhs)
                    plgpu.wgmma_wait(t.wait)
                    return acc

                w_tiles = w_g.at[cols, :] if transpose_rhs else w_g.at[:, cols]

                def run(state):
                    with jax.named_scope("tile"):
                        pipeline(mma, context, state)(
                            x_gmem.at[rows, :], w_tiles, allocations=allocs
                        )

                if not t.chain:
                    run(None)
                    return
                # one pipeline of pipelines over this program's tiles: the first fills
                # the stages, the last drains them; a lone tile runs on its own
                steps, i = info.num_local_steps, info.local_index
                stage = plgpu.PipelinePipeline

                @pl.when(steps == 1)
                def _alone():
                    run(None)

                @pl.when(steps > 1)
                def _chained():
                    mid = jnp.where(i == steps - 1, int(stage.STOP), int(stage.STEADY))
                    run(jnp.where(i == 0, int(stage.START), mid).astype(jnp.int32))

            # the blocks past the used ones get zeros here (the contract of
            # grouped_matmul.gmm), not in a pass over the whole output afterwards
            @pl.when(wg < 2)
            def _zero_spare_blocks():
                zeros = jnp.zeros((BLOCK_M, t.tile_n), dtype)

                @plgpu.nd_loop(((num_blocks - used) * n_iters,), collective_axes="sm")
                def _spare(info):
                    mi, ni = used + info.index[0] // n_iters, info.index[0] % n_iters
                    store(zeros, pl.ds(mi * BLOCK_M, BLOCK_M), columns(ni))

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), dtype),
        grid=(INTERPRET_PROGRAMS if interpret else num_sms() // t.cluster,),
        **(dict(interpret=interpreter()) if interpret else {}),
        grid_names=("sm",),
        **(dict(cluster=(t.cluster,), cluster_names=("cluster",)) if clustered else {}),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
            **(dict(profile_space=PROFILE_SPANS, profile_dir=profile_dir) if profile_dir else {}),
        ),
    )
    used = jnp.reshape(num_used, (1,)).astype(jnp.int32)
    return kernel(block_group.astype(jnp.int32), used, x, w)


#: programs of an interpreted :func:`gmm` (each simulates its three warpgroups on the host)
INTERPRET_PROGRAMS = 2


def interpreter():
    """The parameters of jax's Mosaic GPU interpreter (kernels simulated on the host, with
    shared memory, TMA copies, barriers and ``wgmma``), for ``plgpu.kernel(interpret=)``."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError as e:  # the module is private; older or newer jax may move it
        raise ValueError(
            f"interpret=True needs jax's Mosaic GPU interpreter, not found in jax {jax.__version__}"
        ) from e
    return InterpretGPUParams()


def check_interpret(t: Tiles, transpose_rhs: bool, profile_dir) -> None:
    """What the Mosaic GPU interpreter takes (jax 0.10): no transposed ``wgmma`` operands
    (it has no ``TransposeTransform``), no clusters or profiler; and no ping-pong schedule,
    whose consumers wait on a shared ring's slots by parity and skip the other's phases
    (the interpreter requires every waiter to observe every phase of a barrier)."""
    if t.schedule == "pingpong" or transpose_rhs or t.cluster != 1 or profile_dir:
        raise ValueError(
            f"interpret=True takes the cooperative schedule without transpose_rhs, clusters "
            f"or profile_dir; got schedule={t.schedule!r} transpose_rhs={transpose_rhs} "
            f"cluster={t.cluster} profile_dir={profile_dir!r}"
        )


def store_pieces(out, dst, out_smem, epi: int, slots: int) -> None:
    """A warpgroup's finished tile ``out`` (a value, already in the output dtype) to the
    global ref ``dst`` of its shape, through its shared-memory buffers ``out_smem[slot]``
    with TMA in ``epi x epi`` pieces."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    rows, cols = out.shape
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for p in range((rows // epi) * (cols // epi)):
        i, j = divmod(p, cols // epi)
        slot = p % slots
        plgpu.wait_smem_to_gmem(slots - 1, wait_read_only=True)
        out_smem[slot] = out[i * epi : (i + 1) * epi, j * epi : (j + 1) * epi]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[slot], dst.at[pl.ds(i * epi, epi), pl.ds(j * epi, epi)])


@dataclasses.dataclass(frozen=True)
class TTiles:
    """Tiling of :func:`tgmm`.

    Attributes:
      tile_n: output columns per consumer warpgroup (the CTA's tile is
        ``128 x 2*tile_n`` of ``[K, N]``).
      tile_r: rows of the contraction per pipeline stage, 64 or 128 (a 128-row block is
        ``128 / tile_r`` stages).
      stages: pipeline stages in flight (shared memory: ``stages * (128 + 2*tile_n) *
        tile_r * 2`` bytes, plus the epilogue's ``2 * 2 * 64 * 64 * itemsize``; with a
        float32 ``out_dtype`` 3 stages fit, with a 16-bit one 4).
      band: output tiles of one group are visited in bands of this many along N.
    """

    tile_n: int = 128
    tile_r: int = 64
    stages: int = 3
    band: int = 4

    def replace(self, **kw) -> TTiles:
        return dataclasses.replace(self, **kw)


T_TILES = TTiles()


def tgmm(
    x: Array,
    dy: Array,
    group_start: Array,
    *,
    block_size: int = BLOCK_M,
    tiles: TTiles | None = None,
    out_dtype=jnp.float32,
) -> Array:
    """Per-group ``x^T dy`` over the block-padded layout, ``[G, K, N]`` in ``out_dtype``.

    ``out[g] = x[rows(g)]^T @ dy[rows(g)]`` where ``rows(g)`` are the rows of blocks
    ``group_start[g] .. group_start[g + 1]`` (whole 128-row blocks: no masking at group
    boundaries); an empty group's gradient is zero. The same structure as :func:`gmm`:
    persistent programs over the ``[K, N]`` output tiles of every group, a TMA producer
    warpgroup, two ``wgmma`` consumer warpgroups (``x``'s tile transposed in shared
    memory), float32 accumulators rounded once to ``out_dtype`` as they are stored.

    The reference twin is ``grouped_matmul._tgmm_reference``:
    ``tests/kernels/test_mgpu_block_gmm.py`` holds them equal on a GPU (float32 and bf16
    out; random, skewed and empty groups) and checks the lowering and the errors on CPU;
    ``test_mgpu_gmm.py`` checks the gradients of ``impl="mgpu"`` through it.

    Args:
      x: ``[Nb * 128, K]`` bf16/f16.
      dy: ``[Nb * 128, N]``, x's dtype.
      group_start: int32 ``[G + 1]``, the layout's first block of each group.
      tiles: :class:`TTiles` (default :data:`T_TILES`).
      out_dtype: float32 (the default), or bf16/f16: the float32 accumulators rounded once
        in the epilogue (a weight gradient in the weights' dtype without a float32
        ``[G, K, N]`` round trip through memory).
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    t = tiles or T_TILES
    if block_size != BLOCK_M:
        raise ValueError(f"the Mosaic GPU block tgmm needs block_size={BLOCK_M}, got {block_size}")
    if x.shape[0] != dy.shape[0] or x.shape[0] % BLOCK_M:
        raise ValueError(
            f"x {x.shape} and dy {dy.shape} must have the same rows, whole {BLOCK_M}-row blocks"
        )
    if jnp.dtype(out_dtype) not in (jnp.dtype(jnp.float32), *map(jnp.dtype, DTYPES)):
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if t.tile_r not in (64, 128):  # wgmma on a transposed 16-bit operand: 64-row steps
        raise ValueError(f"tiles.tile_r must be 64 or 128, got {t.tile_r}")
    k, n = x.shape[1], dy.shape[1]
    check_operands(
        x,
        dy,
        [("K (x width)", k, "128", BLOCK_M), ("N (dy width)", n, "2*tile_n", 2 * t.tile_n)],
    )
    num_groups = group_start.shape[0] - 1
    cta_n = 2 * t.tile_n
    k_tiles, n_tiles = k // BLOCK_M, n // cta_n
    steps_per_block = BLOCK_M // t.tile_r
    itemsize = jnp.dtype(x.dtype).itemsize
    epi = 64

    x_transforms = swizzled(BLOCK_M, itemsize)
    dy_transforms = swizzled(cta_n, itemsize)
    out_transforms = swizzled(epi, jnp.dtype(out_dtype).itemsize)

    def body(start_gmem, x_gmem, dy_gmem, out_gmem):
        wg = lax.axis_index("wg")
        wg_cols = pl.ds(wg * t.tile_n, t.tile_n)

        def pipeline(mma, context, first_step=0, steps=1):
            spec = functools.partial(plgpu.BlockSpec, memory_space=plgpu.SMEM)
            return plgpu.emit_pipeline_warp_specialized(
                mma,
                grid=(steps,),
                memory_registers=40,
                in_specs=[
                    spec(
                        (t.tile_r, BLOCK_M), lambda s: (first_step + s, 0), transforms=x_transforms
                    ),
                    spec(
                        (t.tile_r, cta_n), lambda s: (first_step + s, 0), transforms=dy_transforms
                    ),
                ],  # fmt: skip
                wg_axis="wg",
                num_compute_wgs=2,
                max_concurrent_steps=t.stages,
                compute_context=context,
            )

        def noop(*_, **__):
            return None

        # allocate for a static grid of `stages` steps: a shorter static grid would shrink
        # the pipeline to fewer slots and barriers than the run-time grids below index
        allocs = pipeline(noop, noop, 0, t.stages).get_allocations(
            x_gmem.at[:, pl.ds(0, BLOCK_M)], dy_gmem.at[:, pl.ds(0, cta_n)]
        )

        @functools.partial(
            pl.run_scoped,
            allocs=allocs,
            out_smem=plgpu.SMEM((2, 2, epi, epi), out_dtype, transforms=out_transforms),
            collective_axes="wg",
        )
        def _scope(allocs, out_smem):
            @plgpu.nd_loop((num_groups * k_tiles * n_tiles,), collective_axes="sm")
            def _tiles(info):
                g = info.index[0] // (k_tiles * n_tiles)
                ki, ni = plgpu.planar_snake(
                    info.index[0] % (k_tiles * n_tiles), (k_tiles, n_tiles), 1, t.band
                )
                first, last = start_gmem[g], start_gmem[g + 1]
                kcols = pl.ds(ki * BLOCK_M, BLOCK_M)
                ncols = pl.ds(ni * cta_n, cta_n)

                def context(run):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((BLOCK_M, t.tile_n)))
                    def _acc(acc):
                        run(acc)
                        dst = out_gmem.at[g, kcols, ncols].at[:, wg_cols]
                        store_pieces(acc[...].astype(out_dtype), dst, out_smem.at[wg], epi, 2)

                def mma(_, x_smem, dy_smem, acc):
                    plgpu.wgmma(acc, plgpu.transpose_ref(x_smem, (1, 0)), dy_smem.at[:, wg_cols])
                    plgpu.wgmma_wait(0)
                    return acc

                steps = (last - first) * steps_per_block
                pipeline(mma, context, first * steps_per_block, steps)(
                    x_gmem.at[:, kcols], dy_gmem.at[:, ncols], allocations=allocs
                )

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    kernel = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid=(num_sms(),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return kernel(group_start.astype(jnp.int32), x, dy)


__all__ = [
    "BLOCK_M",
    "CHAIN_MAX_K",
    "DTYPES",
    "INTERPRET_PROGRAMS",
    "PINGPONG_TILES",
    "PROFILE_SPANS",
    "SHORT_K_SCHEDULE",
    "SMEM_BYTES",
    "TILES",
    "TTiles",
    "T_TILES",
    "Tiles",
    "check",
    "check_interpret",
    "check_operands",
    "default_tiles",
    "fits",
    "gmm",
    "interpreter",
    "num_sms",
    "pingpong_smem",
    "store_pieces",
    "swizzled",
    "tgmm",
    "tgmm_fits",
]
