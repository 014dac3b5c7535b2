"""The ping-pong schedule of modjax's Hopper block gmm (Mosaic GPU).

:func:`modjax.kernels.mgpu_block_gmm.gmm` takes it for ``Tiles(schedule="pingpong")``
(by default for short contractions, :func:`~modjax.kernels.mgpu_block_gmm.default_tiles`):
the two consumer warpgroups compute whole ``128 x tile_n`` tiles in strict turns over one
shared ring of operand slots, so one's epilogue runs beside the other's mainloop
(:func:`pingpong`). Its checks, tiles and epilogue are ``mgpu_block_gmm``'s; the reference
twin and tests are that module's (``tests/kernels/test_mgpu_block_gmm.py``).

The same kernel (:func:`_kernel`) also takes two weights side by side in a tile, pairs of
operands summed in one contraction, and inputs its epilogue reads: the SwiGLU kernels of
:mod:`modjax.kernels.mgpu_swiglu` (:func:`gmm_swiglu`, :func:`gmm_swiglu_bwd`,
:func:`gmm_sum_t`; their checks and tests are that module's).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from modjax.kernels.mgpu_block_gmm import BLOCK_M, Tiles, num_sms, store_pieces, swizzled


def pingpong(*, num_local, tile, load, mma, store, stages, a_smem, b_smem, full, consumed,
              turn, acc_shape, wait, prefetch=None):  # fmt: skip
    """A ping-pong schedule over this program's ``num_local`` output tiles, inside a
    3-warpgroup kernel: warpgroup 2 streams every tile's operands with TMA into one ring
    of ``stages`` slots; consumer warpgroups 0 and 1 take alternate tiles (``j % 2``), each
    a whole tile with its own float32 accumulator, so one's epilogue runs while the
    other's ``wgmma`` mainloop does.

    The consumers take the ring's slots in tile order, in strict turns: each waits on
    ``turn[wg]`` before its tile's first step and arrives on the other's once it has
    taken its last. A barrier wait knows only its phase's parity (Mosaic GPU tracks it
    per thread, toggled at each wait), so a consumer's waits stay right only when

    * every tile passes over the ring an even number of times (a static step count, a
      multiple of ``2 * stages``): the other consumer's tile then leaves each slot's
      parity as it found it;
    * a consumer starts waiting on a tile's slots only once the other has taken every
      slot of the tile before: without the turns, the second consumer's first wait
      matched the first consumer's fill of the same parity (on the H200, a launch
      failure).

    Args:
      num_local: this program's tile count (traced int32).
      tile: ``j -> info``, a tuple whose first entry is the tile's (static) step count.
      load: ``(info, step, a_dst, b_dst, barrier)`` issues the step's two TMA copies.
      mma: ``(info, acc_ref, a_slot, b_slot)`` issues the step's ``wgmma``.
      store: ``(info, acc)`` the epilogue of a finished tile (float32 ``acc``).
      stages: the ring's slots (``a_smem``, ``b_smem``: ``[stages, ...]``; barriers
        ``full`` and ``consumed``: ``[stages]``; ``turn``: ``[2]``).
      wait: ``wgmma`` groups a consumer leaves in flight after issuing a step's (0 or 1:
        with 1 the tensor cores have the next step queued while the previous one's slot
        is released; a lone consumer's mainloop has no other to fill that gap).
      prefetch: optional ``(info)``, issued by a consumer before its tile's mainloop (e.g.
        TMA loads its epilogue reads), so their latency hides behind the mainloop.
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    wg = lax.axis_index("wg")

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        @pl.loop(0, num_local)
        def _tile(j):
            info = tile(j)

            @pl.loop(0, info[0])
            def _steps(s):
                g = j * info[0] + s
                slot = g % stages

                @pl.when(g >= stages)
                def _reuse():
                    plgpu.barrier_wait(consumed.at[slot])

                load(info, s, a_smem.at[slot], b_smem.at[slot], full.at[slot])

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")

        @pl.loop(0, (num_local - wg + 1) // 2)
        def _tile(i):
            j = 2 * i + wg
            info = tile(j)
            steps, first = info[0], j * info[0]

            def mainloop(acc_ref):
                @pl.when((wg == 1) | (i > 0))
                def _turn():
                    plgpu.barrier_wait(turn.at[wg])

                @pl.loop(0, steps)
                def _steps(s):
                    slot = (first + s) % stages
                    plgpu.barrier_wait(full.at[slot])
                    mma(info, acc_ref, a_smem.at[slot], b_smem.at[slot])
                    plgpu.wgmma_wait(wait)
                    if wait:  # the previous step's wgmma is done: release its slot

                        @pl.when(s > 0)
                        def _release():
                            plgpu.barrier_arrive(consumed.at[(first + s - 1) % stages])

                    else:
                        plgpu.barrier_arrive(consumed.at[slot])

                plgpu.barrier_arrive(turn.at[1 - wg])  # every slot of this tile taken
                if wait:
                    plgpu.wgmma_wait(0)
                    plgpu.barrier_arrive(consumed.at[(first + steps - 1) % stages])
                return acc_ref[...]

            if prefetch is not None:
                prefetch(info)
            with jax.named_scope("mainloop"):
                acc = pl.run_scoped(mainloop, plgpu.ACC(acc_shape))
            with jax.named_scope("epilogue"):
                store(info, acc)


def local_tiles(total):
    """This program's share of ``total`` tiles taken round-robin over the SMs."""
    sms = num_sms()
    return (jnp.maximum(total - lax.axis_index("sm"), 0) + sms - 1) // sms


def gmm(x, w, block_group, num_used, transpose_rhs: bool, t: Tiles):
    """:func:`modjax.kernels.mgpu_block_gmm.gmm` with ``tiles.schedule == "pingpong"`` (see
    :func:`pingpong`): each consumer warpgroup computes whole ``128 x tile_n`` tiles."""
    dtype = x.dtype
    return _kernel((x,), (w,), block_group, num_used, transpose_rhs, t,
                   lambda acc: (acc.astype(dtype),))[0]  # fmt: skip


def gmm_swiglu(x, w_gate, w_up, block_group, num_used, t: Tiles):
    """``(h, gate, up)`` of the block-padded layout's first ``num_used`` blocks, in one kernel:
    ``gate = x[b] @ w_gate[g]``, ``up = x[b] @ w_up[g]`` (each rounded to x's dtype) and
    ``h = silu(gate) * up`` (in float32, rounded to x's dtype), for ``g = block_group[b]``.

    Each ``128 x tile_n`` tile holds ``tile_n / 2`` columns of ``gate`` and the same columns
    of ``up`` (its weight slot is loaded from the two weights, half each), so the epilogue
    has both in registers: it stores ``h`` beside the two projections the backward needs,
    and the activation costs no pass over memory of its own. Checks are the caller's
    (:func:`modjax.kernels.mgpu_swiglu.check_swiglu`).
    """
    from modjax.kernels.grouped_swiglu import swiglu

    dtype = x.dtype
    half = t.tile_n // 2

    def epilogue(acc):
        gate, up = acc[:, :half].astype(dtype), acc[:, half:].astype(dtype)
        return swiglu(gate, up), gate, up

    return _kernel((x,), (w_gate, w_up), block_group, num_used, False, t, epilogue, outputs=3)


def gmm_swiglu_bwd(dy, w_out, gate, up, block_group, num_used, t: Tiles):
    """``(d gate, d up)`` of a SwiGLU expert FFN in one kernel: ``dh = dy[b] @ w_out[g].T``
    (rounded to dy's dtype, as a grouped matmul's output is) and the activation's backward
    (:func:`modjax.kernels.grouped_swiglu.swiglu_grad`) in the epilogue.

    Each consumer warpgroup loads its tile's ``gate`` and ``up`` tiles with TMA before its
    mainloop (:func:`pingpong`'s ``prefetch``), so ``dh`` never makes a round trip through
    memory and the activation's backward no pass of its own. Checks are the caller's
    (:func:`modjax.kernels.mgpu_swiglu.check_swiglu_bwd`).
    """
    from modjax.kernels.grouped_swiglu import swiglu_grad

    dtype = dy.dtype

    def epilogue(acc, gate_ref, up_ref):
        import jax.experimental.pallas.mosaic_gpu as plgpu

        gate, up = (plgpu.load(r, (), layout=plgpu.Layout.WGMMA) for r in (gate_ref, up_ref))
        return swiglu_grad(acc.astype(dtype), gate, up)

    return _kernel((dy,), (w_out,), block_group, num_used, True, t, epilogue, outputs=2,
                   epi_inputs=(gate, up))  # fmt: skip


def gmm_sum_t(xs, ws, block_group, num_used, t: Tiles):
    """``sum_i xs[i][b] @ ws[i][g].T`` for ``g = block_group[b]``, one contraction over all
    pairs (the input gradient of projections that share their input, such as SwiGLU's two:
    one output instead of one per projection and a sum). Checks are the caller's
    (:func:`modjax.kernels.mgpu_swiglu.check_gmm_sum_t`)."""
    dtype = xs[0].dtype
    return _kernel(tuple(xs), tuple(ws), block_group, num_used, True, t,
                   lambda acc: (acc.astype(dtype),))[0]  # fmt: skip


def _kernel(xs, ws, block_group, num_used, transpose_rhs, t: Tiles, epilogue, outputs=1,
            epi_inputs=()):  # fmt: skip
    """The ping-pong block gmm of the rows ``xs`` against the weights ``ws``, with
    ``epilogue(acc) -> outputs`` arrays of ``128 x out_n`` (each output ``[M, N]``):

    * one ``x`` and one weight: a plain gmm (``out_n = tile_n``);
    * one ``x`` and two weights: their columns share each tile half and half (``out_n =
      tile_n / 2``; N is each weight's output width);
    * as many ``x`` as weights: the pairs are summed, one contraction over all of them
      (``sum_i xs[i] @ ws[i][g]``: the steps of pair ``i`` follow those of pair ``i - 1``).

    With ``epi_inputs`` (``[M, N]`` arrays), each consumer loads its tile of every one into
    shared memory before its mainloop, and the epilogue runs per 64-row piece as
    ``epilogue(acc_piece, *input_piece_refs)``.
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = xs[0].shape
    w = ws[0]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    dtype = xs[0].dtype
    tn, tk = t.tile_n, t.tile_k
    n_parts = len(ws) if len(xs) == 1 else 1  # weights side by side in a tile
    out_n = tn // n_parts  # output columns per tile (of each weight)
    part_steps = k // tk  # contraction steps of one (x, weight) pair
    n_iters, k_iters = n // out_n, part_steps * len(xs)
    num_blocks = m // BLOCK_M
    itemsize = jnp.dtype(dtype).itemsize
    x_transforms = swizzled(tk, itemsize)
    # one slot per weight side by side: a tile's columns of each (contiguous for TMA)
    w_shape = (n_parts, out_n, tk) if transpose_rhs else (n_parts, tk, out_n)
    w_transforms = x_transforms if transpose_rhs else swizzled(out_n, itemsize)
    slots = min(2, (BLOCK_M // t.epi) * (out_n // t.epi))
    minor = 1 if t.minor == "n" else 0

    n_in = len(epi_inputs)
    piece = 64  # rows of an epilogue piece with inputs (a wgmma row group)

    def body(group_gmem, used_gmem, *refs):
        x_gmems, refs = refs[: len(xs)], refs[len(xs) :]
        w_gmems, in_gmems, out_gmems = (
            refs[: len(ws)],
            refs[len(ws) : len(ws) + n_in],
            refs[len(ws) + n_in :],
        )
        wg = lax.axis_index("wg")
        used = used_gmem[0]

        def tile(j):
            index = lax.axis_index("sm") + j * num_sms()
            mi, ni = plgpu.planar_snake(index, (used, n_iters), minor, t.band)
            return k_iters, mi, ni, group_gmem[mi]

        def w_tile(w_gmem, g, cols, ks):
            return w_gmem.at[g, cols, ks] if transpose_rhs else w_gmem.at[g, ks, cols]

        def load(info, s, x_dst, w_dst, barrier):
            _, mi, ni, g = info
            rows, cols = pl.ds(mi * BLOCK_M, BLOCK_M), pl.ds(ni * out_n, out_n)
            if len(xs) == 1:
                ks = pl.ds(s * tk, tk)
                plgpu.copy_gmem_to_smem(x_gmems[0].at[rows, ks], x_dst, barrier)
                for i, w_gmem in enumerate(w_gmems):
                    plgpu.copy_gmem_to_smem(w_tile(w_gmem, g, cols, ks), w_dst.at[i], barrier)
                return
            ks = pl.ds((s % part_steps) * tk, tk)
            for i, (x_gmem, w_gmem) in enumerate(zip(x_gmems, w_gmems, strict=True)):

                @pl.when(s // part_steps == i)
                def _pair(x_gmem=x_gmem, w_gmem=w_gmem):
                    plgpu.copy_gmem_to_smem(x_gmem.at[rows, ks], x_dst, barrier)
                    plgpu.copy_gmem_to_smem(w_tile(w_gmem, g, cols, ks), w_dst.at[0], barrier)

        def mma(info, acc_ref, x_slot, w_slot):
            for i in range(n_parts):  # each weight's columns into its part of the tile
                acc = acc_ref.at[:, pl.ds(i * out_n, out_n)] if n_parts > 1 else acc_ref
                rhs = w_slot.at[i].transpose((1, 0)) if transpose_rhs else w_slot.at[i]
                plgpu.wgmma(acc, x_slot, rhs)

        # each consumer's tiles of the epilogue's inputs, and their barrier
        inputs_scratch = dict(
            in_smem=plgpu.SMEM((2, n_in, BLOCK_M, out_n), dtype,
                               transforms=swizzled(out_n, itemsize)),
            in_full=plgpu.Barrier(num_arrivals=n_in, num_barriers=2),
        ) if n_in else {}  # fmt: skip

        @functools.partial(
            pl.run_scoped,
            a_smem=plgpu.SMEM((t.stages, BLOCK_M, tk), dtype, transforms=x_transforms),
            b_smem=plgpu.SMEM((t.stages, *w_shape), dtype, transforms=w_transforms),
            out_smem=plgpu.SMEM(
                (2, slots, t.epi, t.epi), dtype, transforms=swizzled(t.epi, itemsize)
            ),
            full=plgpu.Barrier(num_arrivals=1 + n_parts, num_barriers=t.stages),
            consumed=plgpu.Barrier(num_barriers=t.stages),
            turn=plgpu.Barrier(num_barriers=2),
            **inputs_scratch,
            collective_axes="wg",
        )
        def _scope(a_smem, b_smem, out_smem, full, consumed, turn, in_smem=None, in_full=None):
            def tile_of(ref, mi, ni):
                return ref.at[pl.ds(mi * BLOCK_M, BLOCK_M), pl.ds(ni * out_n, out_n)]

            def store_tile(values, mi, ni, rows=BLOCK_M, row0=0):
                for value, out_gmem in zip(values, out_gmems, strict=True):
                    dst = tile_of(out_gmem, mi, ni).at[pl.ds(row0, rows)]
                    store_pieces(value, dst, out_smem.at[wg], t.epi, slots)

            def prefetch(info):
                _, mi, ni, _ = info
                for i, in_gmem in enumerate(in_gmems):
                    plgpu.copy_gmem_to_smem(tile_of(in_gmem, mi, ni), in_smem.at[wg, i],
                                            in_full.at[wg])  # fmt: skip

            def store(info, acc):
                _, mi, ni, _ = info
                if not n_in:
                    store_tile(epilogue(acc), mi, ni)
                    return
                plgpu.barrier_wait(in_full.at[wg])
                for p in range(BLOCK_M // piece):
                    rows = pl.ds(p * piece, piece)
                    ins = [in_smem.at[wg, i, rows] for i in range(n_in)]
                    values = epilogue(acc[p * piece : (p + 1) * piece], *ins)
                    store_tile(values, mi, ni, piece, p * piece)

            pingpong(
                num_local=local_tiles(used * n_iters), tile=tile, load=load, mma=mma,
                store=store, stages=t.stages, a_smem=a_smem, b_smem=b_smem, full=full,
                consumed=consumed, turn=turn, acc_shape=(BLOCK_M, tn), wait=t.wait * n_parts,
                prefetch=prefetch if n_in else None,
            )  # fmt: skip

            # the blocks past the used ones get zeros (the contract of grouped_matmul.gmm),
            # each consumer warpgroup every other one of this program's spare tiles
            @pl.when(wg < 2)
            def _zero_spare_blocks():
                zeros = jnp.zeros((BLOCK_M, out_n), dtype)

                @pl.loop(wg, local_tiles((num_blocks - used) * n_iters), step=2)
                def _spare(j):
                    index = lax.axis_index("sm") + j * num_sms()
                    store_tile((zeros,) * outputs, used + index // n_iters, index % n_iters)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    out = jax.ShapeDtypeStruct((m, n), dtype)
    kernel = plgpu.kernel(
        body,
        out_type=(out,) * outputs,
        grid=(num_sms(),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    used = jnp.reshape(num_used, (1,)).astype(jnp.int32)
    return kernel(block_group.astype(jnp.int32), used, *xs, *ws, *epi_inputs)


__all__ = ["gmm", "gmm_sum_t", "gmm_swiglu", "gmm_swiglu_bwd", "local_tiles", "pingpong"]
