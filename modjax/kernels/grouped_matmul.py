"""Grouped matrix multiplication over variable-size groups of rows, with custom gradients.

Rows of an operand are sorted by group (expert) and each group is padded to a multiple of
``block_size`` rows ("block-padded layout"), so every block of rows belongs to exactly one
group. Then

* :func:`gmm` ``out[b] = x[b] @ w[group(b)]`` (or ``@ w[group(b)].T``): the forward
  matmul and the input gradient;
* :func:`tgmm` ``dw[g] = sum_{b in g} x[b].T @ dy[b]``: the per-group weight gradient.

``gmm`` carries a ``jax.custom_vjp`` built from those two, so each grouped matmul costs
three grouped matmuls forward+backward and never touches the other groups' weights.

Implementations (``impl=``), all computing the same function:

* ``"reference"``: a loop over groups of masked dense matmuls, obviously correct and G
  times the work; the twin every fast path is tested against.
* ``"xla"``: a ``fori_loop`` over the used blocks, a batched matmul over a few blocks
  at a time (the CPU path of a lone grouped matmul; the dropless expert FFN fuses its
  three into one loop of plain dots instead, :mod:`modjax.kernels.xla_expert_ffn`).
* ``"pallas"``: Triton-lowered Pallas kernels (:mod:`modjax.kernels.pallas_gmm`), for
  GPUs; with ``interpret=True`` they run anywhere (slowly), which the tests use on CPU.
* ``"mgpu"``: Hopper (Mosaic GPU, wgmma/TMA) kernels (:mod:`modjax.kernels.mgpu_gmm`):
  modjax's warp-specialised block kernels for :func:`gmm` and :func:`tgmm`, jax's
  ragged-dot kernels for widths their tiles do not fit; bf16/f16 on NVIDIA Hopper GPUs
  only.
* ``"auto"`` (default): ``"xla"`` off the GPU; on a GPU, chosen per primitive from kernel
  timings on an H200 (``benchmarks/gmm_tiles.py``): ``"mgpu"`` for :func:`tgmm` where it
  applies (Hopper, bf16/f16, widths multiples of 128: 1.4-2x the Pallas weight
  gradient), ``"mgpu"`` for :func:`gmm` where the block kernel's tiles fit and the
  contraction is at least 512 wide (``mgpu_gmm.prefers_gmm``), ``"pallas"`` otherwise.

Inputs are bf16/f16/f32; products accumulate in float32 and are cast back to the
operand dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from modjax.kernels import mgpu_gmm, pallas_rows
from modjax.typing import Array

IMPLS = ("auto", "reference", "xla", "pallas", "mgpu")
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class GroupLayout(NamedTuple):
    """Where each block of a block-padded operand belongs.

    Attributes:
      block_group: int32 ``[Nb]``: the group of each block (blocks past the used ones
        repeat the last group; they hold only padding).
      group_start: int32 ``[G + 1]``: first block of each group; ``group_start[G]`` is the
        number of used blocks.
    """

    block_group: Array
    group_start: Array

    @property
    def num_groups(self) -> int:
        return self.group_start.shape[0] - 1

    @property
    def num_blocks(self) -> int:
        return self.block_group.shape[0]


def max_blocks(num_rows: int, num_groups: int, block_size: int) -> int:
    """Static bound on the blocks needed: ``sum_g ceil(n_g / bs) <= (M + G (bs-1)) / bs``."""
    return max(1, (num_rows + num_groups * (block_size - 1)) // block_size)


def group_layout(group_sizes: Array, num_rows: int, block_size: int) -> GroupLayout:
    """The block-padded layout of groups with these sizes (int ``[G]``, summing to <= M)."""
    _check_block_size(block_size)
    group_sizes = jnp.asarray(group_sizes, jnp.int32)
    num_groups = group_sizes.shape[0]
    blocks_per_group = (group_sizes + block_size - 1) // block_size
    ends = jnp.cumsum(blocks_per_group)
    group_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends]).astype(jnp.int32)
    nb = max_blocks(num_rows, num_groups, block_size)
    # compare-all, not jnp.searchsorted's default binary search: that one is a while loop
    # of log2(G) steps, each a few tiny kernels and device copies plus the loop's own
    # control. On the H200 the loop cost the small shape's layer ~0.07 ms a call (fwd+bwd
    # 0.65 of dense with it, 0.69 without; benchmarks/RESULTS.md)
    block_group = jnp.searchsorted(
        ends, jnp.arange(nb, dtype=jnp.int32), side="right", method="compare_all"
    )
    block_group = jnp.minimum(block_group, num_groups - 1).astype(jnp.int32)
    return GroupLayout(block_group=block_group, group_start=group_start)


#: how :func:`sort_to_blocks` ranks rows inside their group by default: ``"sort"`` (one
#: sort of packed keys), ``"count"`` (a running count over a one-hot ``[M, G]``, no sort)
#: or ``"auto"``: counting on a GPU, the sort elsewhere. Both give the same layout. On the
#: 2-core CPU counting is 2-8x slower (4.3 against 0.73 ms at M = 16384, G = 64). On the
#: H200 the layer's fwd+bwd with counting took 1.138 ms against the sort's 1.213 at the
#: small shape (0.74 against 0.69 of dense) and 10.23 against 10.24 at OLMoE's (fwd 3.79
#: against 3.96), interleaved in one process (``benchmarks/RESULTS.md``, ninth session).
LAYOUT_RANKS = "auto"


def _layout_ranks(ranks: str | None) -> str:
    ranks = ranks or LAYOUT_RANKS
    if ranks == "auto":
        return "count" if _on_gpu() else "sort"
    if ranks not in ("sort", "count"):
        raise ValueError(f"ranks must be 'sort', 'count' or 'auto', got {ranks!r}")
    return ranks


def sort_to_blocks(
    group_ids: Array,
    num_groups: int,
    block_size: int,
    valid: Array | None = None,
    *,
    ranks: str | None = None,
) -> tuple[Array, Array, GroupLayout]:
    """Positions of rows in the block-padded layout, grouped by ``group_ids``.

    Args:
      group_ids: int ``[M]`` group of each row, in ``[0, G)``.
      num_groups: G.
      block_size: rows per block.
      valid: optional bool ``[M]``: rows to place. Invalid rows (padding, dropped
        assignments) join no group, so no block holds them and the kernels skip the
        blocks they would have filled; their ``position`` is 0 (mask their outputs).
      ranks: ``"sort"``, ``"count"`` or ``"auto"``, how rows are ranked inside their
        group (the same result; default :data:`LAYOUT_RANKS`). ``"count"`` holds an int32
        ``[M, G]`` running count.

    Returns:
      ``(position, source, layout)``: int32 ``[M]`` padded row of each row; int32
      ``[Nb * block_size]`` source row of each padded row (``M`` for padding); and the
      :class:`GroupLayout`. Rows keep their order inside a group (stable).
    """
    ranks = _layout_ranks(ranks)
    m = group_ids.shape[0]
    group_ids = group_ids.astype(jnp.int32)
    if valid is not None:  # invalid rows get the sentinel group G: sorted last, counted nowhere
        group_ids = jnp.where(valid, group_ids, num_groups)
    if ranks == "count":
        # the running count of each group over the rows: its value at a row, less one,
        # is the row's rank in its group; its last row is the group sizes
        counts = jnp.cumsum(jax.nn.one_hot(group_ids, num_groups, dtype=jnp.int32), axis=0)
        sizes = counts[-1] if m else jnp.zeros((num_groups,), jnp.int32)
        layout = group_layout(sizes, m, block_size)
        ids = jnp.minimum(group_ids, num_groups - 1)
        rank = jnp.take_along_axis(counts, ids[:, None], axis=1)[:, 0] - 1
        position = layout.group_start[ids] * block_size + rank
        padded_rows = layout.num_blocks * block_size
        position = jnp.where(group_ids < num_groups, position, padded_rows)  # out of range
    else:
        sizes = jnp.zeros((num_groups,), jnp.int32).at[group_ids].add(1, mode="drop")
        layout = group_layout(sizes, m, block_size)
        order, sorted_ids = _stable_sort_by_group(group_ids, num_groups + 1)
        ids_in_range = jnp.minimum(sorted_ids, num_groups - 1)
        row_start = jnp.cumsum(sizes) - sizes
        rank = jnp.arange(m, dtype=jnp.int32) - row_start[ids_in_range]
        padded_rows = layout.num_blocks * block_size
        pos_sorted = layout.group_start[ids_in_range] * block_size + rank
        pos_sorted = jnp.where(sorted_ids < num_groups, pos_sorted, padded_rows)  # out of range
        position = jnp.zeros((m,), jnp.int32).at[order].set(pos_sorted)
    source = jnp.full((padded_rows,), m, jnp.int32).at[position].set(jnp.arange(m), mode="drop")
    return jnp.where(position < padded_rows, position, 0), source, layout


def _stable_sort_by_group(group_ids: Array, num_keys: int) -> tuple[Array, Array]:
    """``(order, group_ids[order])`` with ``order = argsort(group_ids, stable=True)``, for
    ids in ``[0, num_keys)``.

    Where ``num_keys * M`` fits in int32, one sort of the unique keys ``id * M + row``
    (same order: ties broken by row) instead of argsort's two-operand stable sort, which
    XLA:CPU runs ~5x slower (16384 rows: 0.6 ms against 3-4 ms on a 2-core CPU).
    """
    m = group_ids.shape[0]
    rows = jnp.arange(m, dtype=jnp.int32)
    if num_keys * m > jnp.iinfo(jnp.int32).max:
        order = jnp.argsort(group_ids, stable=True).astype(jnp.int32)
        return order, group_ids[order]
    keys = lax.sort(group_ids * m + rows)
    sorted_ids = keys // m
    return keys - sorted_ids * m, sorted_ids


# --------------------------------------------------------------------------------------
# moving rows into and out of the block-padded layout, with gather-only gradients
#
# ``position`` and ``source`` of :func:`sort_to_blocks` are inverse maps, so the gradient
# of each gather below is another gather. Written as plain ``jnp.take`` the gradients
# would be scatter-adds, which GPUs run with atomics (emulated for bf16). The plain
# forms are the reference twins (``to_blocks_reference``, ``from_blocks_reference``).


def to_blocks_reference(x, source, position, valid, k: int):
    """``xp[p] = x[source[p] // k]`` (zero where ``source[p]`` is padding)."""
    del position, valid
    return jnp.take(x, source // k, axis=0, mode="fill", fill_value=0)


def from_blocks_reference(yp, position, source, valid):
    """``y[i] = yp[position[i]]`` where ``valid[i]``, else zero."""
    del source
    return jnp.where(valid[:, None], jnp.take(yp, position, axis=0), 0).astype(yp.dtype)


#: whether ``impl="auto"`` moves rows into the layout with the Pallas kernel
#: :func:`pallas_rows.scatter_rows` on a GPU (the layout's input and the combine's
#: gradient; off: XLA's gathers, the benchmarks' ``+xlarows`` variant). On the H200 it ran
#: those moves 1.2-1.6x faster than XLA's gathers (``benchmarks/row_moves.py``).
ROW_KERNELS = True
#: whether ``impl="auto"`` also sums rows out of the layout with
#: :func:`pallas_rows.gather_sum` (the combine, and the layout input's gradient). Off: on
#: the H200 at OLMoE's shape the kernel at its best tiling ran even with XLA's gathers
#: (2.2 against 2.1-2.3 TB/s), so ``"auto"`` keeps XLA's.
GATHER_KERNELS = False


class _RowModes(NamedTuple):
    """How each direction of the row moves runs: ``"xla"`` (the gathers below),
    ``"pallas"`` (:mod:`modjax.kernels.pallas_rows` compiled) or ``"interpret"``."""

    scatter: str
    gather: str


def _row_modes(impl: str, interpret: bool, a: Array) -> _RowModes:
    """The row moves' :class:`_RowModes` for ``impl`` and rows like ``a``.

    ``"auto"`` takes the kernels on a GPU as :data:`ROW_KERNELS` and
    :data:`GATHER_KERNELS` say (XLA's gathers elsewhere); ``"pallas"`` and ``"mgpu"``
    take both on a GPU. With ``interpret`` the kernels taken run in interpret mode (like
    :func:`_pick`'s, on any backend for ``"pallas"``). Rows that are not float or not a
    multiple of 16 wide (:func:`pallas_rows.fits`) always move by XLA's gathers.
    """
    kernels_take = pallas_rows.fits(a.shape[-1]) and jnp.issubdtype(a.dtype, jnp.floating)
    if impl in ("xla", "reference") or not kernels_take:
        return _RowModes("xla", "xla")
    if impl != "auto":
        if interpret:
            return _RowModes("interpret", "interpret")
        return _RowModes("pallas", "pallas") if _on_gpu() else _RowModes("xla", "xla")
    if not _on_gpu():
        return _RowModes("xla", "xla")
    on = lambda flag: ("interpret" if interpret else "pallas") if flag else "xla"
    return _RowModes(on(ROW_KERNELS), on(ROW_KERNELS and GATHER_KERNELS))


def _assignments(position: Array, valid: Array, k: int) -> Array:
    """``[T, k]`` padded row of each assignment, ``-1`` where not placed."""
    return jnp.where(valid, position, -1).reshape(-1, k)


def _scatter(x, position, valid, source, k, mode, scale=None, dot_with=None, out_dtype=None):
    return pallas_rows.scatter_rows(
        x, _assignments(position, valid, k), source, scale, dot_with=dot_with,
        out_dtype=out_dtype, interpret=mode == "interpret",
    )  # fmt: skip


def _gather_sum(yp, position, valid, k, mode, scale=None, out_dtype=None):
    pos = _assignments(position, valid, k)
    return pallas_rows.gather_sum(
        yp, pos, scale, out_dtype=out_dtype, interpret=mode == "interpret"
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _to_blocks(x, source, position, valid, k, modes):
    if modes.scatter == "xla":
        return to_blocks_reference(x, source, position, valid, k)
    return _scatter(x, position, valid, source, k, modes.scatter)


def _to_blocks_fwd(x, source, position, valid, k, modes):
    return _to_blocks(x, source, position, valid, k, modes), (position, valid)


def _to_blocks_bwd(k, modes, res, g):
    position, valid = res
    if modes.gather != "xla":
        return _gather_sum(g, position, valid, k, modes.gather), None, None, None
    rows = jnp.where(valid[:, None], jnp.take(g, position, axis=0), 0)  # [T*k, D]
    dx = rows.reshape(-1, k, g.shape[1]).sum(axis=1, dtype=jnp.float32).astype(g.dtype)
    return dx, None, None, None


_to_blocks.defvjp(_to_blocks_fwd, _to_blocks_bwd)


@jax.custom_vjp
def _from_blocks(yp, position, source, valid):
    return from_blocks_reference(yp, position, source, valid)


def _from_blocks_fwd(yp, position, source, valid):
    return _from_blocks(yp, position, source, valid), source


def _from_blocks_bwd(source, g):
    return jnp.take(g, source, axis=0, mode="fill", fill_value=0), None, None, None


_from_blocks.defvjp(_from_blocks_fwd, _from_blocks_bwd)


def combine_from_blocks_reference(yp, weight, position, source, valid, dtype):
    """``y[t] = sum_j weight[t, j] * yp[position[t*k + j]]`` over the ``valid`` assignments:
    :func:`from_blocks` then the weighted sum (weights rounded to ``yp``'s dtype, float32
    accumulation, the result in ``dtype``)."""
    t, k = weight.shape
    rows = from_blocks_reference(yp, position, source, valid).reshape(t, k, -1)
    out = jnp.einsum("tkd,tk->td", rows, weight.astype(yp.dtype),
                     preferred_element_type=jnp.float32)  # fmt: skip
    return out.astype(dtype)


def row_weights(weight: Array, source: Array, dtype) -> Array:
    """``[P]``: each padded row's routing weight (``[T, k]`` ``weight`` rounded to ``dtype``,
    as the combine rounds it), zero on the padding rows."""
    return jnp.take(weight.astype(dtype).reshape(-1), source, mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _combine_from_blocks(yp, weight, position, source, valid, dtype, modes):
    if modes.gather == "xla":
        return combine_from_blocks_reference(yp, weight, position, source, valid, dtype)
    k = weight.shape[1]
    return _gather_sum(yp, position, valid, k, modes.gather, weight.astype(yp.dtype), dtype)


def _combine_from_blocks_fwd(yp, weight, position, source, valid, dtype, modes):
    out = _combine_from_blocks(yp, weight, position, source, valid, dtype, modes)
    return out, (yp, weight, position, source, valid)


def _combine_from_blocks_bwd(dtype, modes, res, dy):
    yp, weight, position, source, valid = res
    t, k = weight.shape
    f32 = jnp.float32
    if modes.scatter != "xla":
        w = weight.astype(yp.dtype)
        dyp, dw = _scatter(dy, position, valid, source, k, modes.scatter, w, yp, yp.dtype)
        return dyp, dw.astype(weight.dtype), None, None, None
    # each padded row's gradient straight from its token's: no [T, k, D] buffer between
    w_row = row_weights(weight, source, yp.dtype)
    dy_row = jnp.take(dy, source // k, axis=0, mode="fill", fill_value=0)
    dyp = (dy_row.astype(f32) * w_row.astype(f32)[:, None]).astype(yp.dtype)
    rows = from_blocks_reference(yp, position, source, valid).reshape(t, k, -1)
    dw = jnp.einsum("tkd,td->tk", rows, dy.astype(yp.dtype), preferred_element_type=f32)
    return dyp, dw.astype(weight.dtype), None, None, None


_combine_from_blocks.defvjp(_combine_from_blocks_fwd, _combine_from_blocks_bwd)


def check_combine(weight: Array, position: Array, source: Array, valid: Array, rows: int):
    """The shapes :func:`combine_from_blocks` takes for ``rows`` padded rows (a named error)."""
    t, k = weight.shape
    if position.shape != (t * k,) or valid.shape != position.shape:
        raise ValueError(
            f"position {position.shape} and valid {valid.shape} must be [T*k] = [{t * k}] "
            f"for weight {weight.shape}"
        )
    if source.shape != (rows,):
        raise ValueError(f"source {source.shape} must be [P] = [{rows}]")


def combine_from_blocks(
    yp: Array,
    weight: Array,
    position: Array,
    source: Array,
    valid: Array,
    dtype=None,
    *,
    impl: str = "auto",
    interpret: bool = False,
) -> Array:
    """The MoE combine out of the block-padded layout: ``[P, D]`` rows and ``[T, k]``
    weights to ``[T, D]``, ``y[t] = sum_j weight[t, j] * yp[position[t*k + j]]`` over the
    ``valid`` assignments, in ``dtype`` (default ``yp``'s).

    The same function as :func:`from_blocks` followed by the weighted sum
    (:func:`combine_from_blocks_reference`, its twin in the tests), with a gradient that
    gathers each padded row's gradient straight from its token's (``dy[t] *
    weight[t, j]``) instead of building the ``[T, k, D]`` assignment gradient and gathering
    from that (on the H200 at OLMoE's shape that buffer cost 0.16 ms to write and its
    gather 0.43 ms; backward temporaries went from 2416 to 1905 MiB).
    """
    check_combine(weight, position, source, valid, yp.shape[0])
    modes = _row_modes(_check_impl(impl), interpret, yp)
    dtype = jnp.dtype(dtype or yp.dtype)
    return _combine_from_blocks(yp, weight, position, source, valid, dtype, modes)


def inverse_permutation(perm: Array) -> Array:
    """``inv`` with ``inv[perm[i]] = i`` (``argsort(perm)`` without the sort)."""
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def permute_rows(x: Array, perm: Array, inverse: Array | None = None) -> Array:
    """``x[perm]`` for a permutation ``perm`` of the rows, with a gather for gradient
    (``x[perm]``'s plain gradient is a scatter-add): :func:`to_blocks` with every row
    placed. ``inverse``: :func:`inverse_permutation` of ``perm``, computed when not given."""
    if perm.shape != (x.shape[0],):
        raise ValueError(f"perm must be a permutation of x's {x.shape[0]} rows, got {perm.shape}")
    if inverse is None:
        inverse = inverse_permutation(perm)
    return _to_blocks(x, perm, inverse, jnp.ones(perm.shape, bool), 1, _RowModes("xla", "xla"))


def to_blocks(
    x: Array,
    source: Array,
    position: Array,
    valid: Array,
    k: int = 1,
    *,
    impl: str = "auto",
    interpret: bool = False,
) -> Array:
    """Rows of ``x [T, D]`` into the block-padded layout ``[P, D]`` of ``sort_to_blocks``.

    Row ``i`` of the layout's input (``i`` in ``[0, T*k)``, ``k`` assignments per row of
    ``x``) is ``x[i // k]``; ``valid [T*k]`` marks the rows that were placed. Padding rows
    are zero. The gradient is a gather (each x row sums its k placed copies).

    ``position`` and ``source`` must invert each other over the valid rows, as those of
    :func:`sort_to_blocks` do: on a GPU (``impl="auto"``) the rows are scattered by
    ``position`` (:func:`pallas_rows.scatter_rows`) and the rows ``source`` marks as
    padding are zeroed, where XLA's twin gathers by ``source``.
    """
    if position.shape != (x.shape[0] * k,) or valid.shape != position.shape:
        raise ValueError(
            f"position {position.shape} and valid {valid.shape} must be [T*k] = "
            f"[{x.shape[0] * k}] for x {x.shape}, k={k}"
        )
    return _to_blocks(x, source, position, valid, k, _row_modes(_check_impl(impl), interpret, x))


def from_blocks(yp: Array, position: Array, source: Array, valid: Array) -> Array:
    """Rows ``[M, D]`` back out of the block-padded layout ``yp [P, D]``: row ``i`` is
    ``yp[position[i]]`` where ``valid[i]``, else zero. The gradient is a gather."""
    if source.shape != (yp.shape[0],):
        raise ValueError(f"source {source.shape} must be [P] = [{yp.shape[0]}]")
    return _from_blocks(yp, position, source, valid)


# --------------------------------------------------------------------------------------
# checks


def _check_block_size(block_size) -> None:
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def _check_impl(impl: str) -> str:
    """Validates ``impl``; ``"auto"`` stays as it is until :func:`_pick` sees the operands."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "mgpu" and not _on_gpu():
        raise ValueError(
            f"impl='mgpu' runs on NVIDIA Hopper GPUs only; the default backend is "
            f"{jax.default_backend()!r} (use impl='xla', or 'pallas' with interpret=True)"
        )
    return impl


def _on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def runs_on_xla(impl: str) -> bool:
    """Whether ``impl`` means the XLA loops here (``"xla"``, or ``"auto"`` off the GPU):
    where a caller may fuse more than one grouped matmul into one loop of its own."""
    return _check_impl(impl) == "xla" or (impl == "auto" and not _on_gpu())


def _pick(
    impl: str, op: str, a: Array, b: Array, block_size: int, interpret: bool, transpose_rhs=False
) -> str:
    """The implementation that ``impl`` means for primitive ``op`` on operands ``a, b``.

    On a GPU, "auto" takes a Mosaic GPU kernel only in the configuration its GPU tests
    and timings cover (blocks a multiple of its 128-row tile), Pallas otherwise.
    """
    if impl != "auto":
        return impl
    if not _on_gpu():
        return "xla"
    if interpret or block_size % 128:
        return "pallas"
    if op == "tgmm" and mgpu_gmm.supports_tgmm(a, b):
        return "mgpu"
    if op == "gmm" and mgpu_gmm.prefers_gmm(a, b, transpose_rhs):
        return "mgpu"
    return "pallas"


def _check_dtype(name: str, a: Array) -> None:
    if a.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} dtype must be one of float32/bfloat16/float16, got {a.dtype}")


def _check_gmm(x: Array, w: Array, layout: GroupLayout, block_size: int, transpose_rhs):
    _check_block_size(block_size)
    _check_dtype("x", x)
    _check_dtype("w", w)
    if x.ndim != 2 or w.ndim != 3:
        raise ValueError(f"x must be [M, K] and w [G, K, N]; got x {x.shape}, w {w.shape}")
    k = w.shape[2] if transpose_rhs else w.shape[1]
    if x.shape[1] != k:
        raise ValueError(
            f"x width {x.shape[1]} does not match w's contracting width {k} "
            f"(w {w.shape}, transpose_rhs={transpose_rhs})"
        )
    if w.shape[0] != layout.num_groups:
        raise ValueError(f"w has {w.shape[0]} groups but layout has {layout.num_groups}")
    if x.shape[0] != layout.num_blocks * block_size:
        raise ValueError(
            f"x has {x.shape[0]} rows; block-padded layout needs "
            f"{layout.num_blocks} * {block_size} = {layout.num_blocks * block_size}"
        )


# --------------------------------------------------------------------------------------
# implementations of the two primitives


def _gmm_reference(x, w, layout, block_size, transpose_rhs):
    rows_group = jnp.repeat(layout.block_group, block_size)
    used = jnp.arange(x.shape[0]) < layout.group_start[-1] * block_size
    out = jnp.zeros((x.shape[0], w.shape[1] if transpose_rhs else w.shape[2]), jnp.float32)
    for g in range(w.shape[0]):
        wg = w[g].T if transpose_rhs else w[g]
        prod = jnp.dot(x, wg, preferred_element_type=jnp.float32)
        out = out + jnp.where(((rows_group == g) & used)[:, None], prod, 0.0)
    return out.astype(x.dtype)


def _tgmm_reference(x, dy, layout, block_size):
    rows_group = jnp.repeat(layout.block_group, block_size)
    used = jnp.arange(x.shape[0]) < layout.group_start[-1] * block_size
    out = []
    for g in range(layout.num_groups):
        mask = ((rows_group == g) & used)[:, None]
        xg = jnp.where(mask, x, 0)
        out.append(jnp.dot(xg.T, dy, preferred_element_type=jnp.float32))
    return jnp.stack(out)


# Blocks per step of the XLA loops: a batched matmul over CHUNK blocks keeps XLA:CPU's
# threads busy (one 128-row matmul at a time left a core idle), while the gathered
# weights stay a constant CHUNK * K * N, independent of T.
_XLA_CHUNK = 8


def _chunked_blocks(layout, chunk):
    """Block ids padded to whole chunks, a mask of the used ones, the chunk count."""
    nb = layout.num_blocks
    num_chunks = -(-nb // chunk)
    ids = jnp.arange(num_chunks * chunk, dtype=jnp.int32)
    used = ids < layout.group_start[-1]
    groups = jnp.pad(layout.block_group, (0, num_chunks * chunk - nb), mode="edge")
    n_used_chunks = (layout.group_start[-1] + chunk - 1) // chunk
    return groups, used, num_chunks, n_used_chunks


def _gmm_xla(x, w, layout, block_size, transpose_rhs):
    nb, bs, c = layout.num_blocks, block_size, _XLA_CHUNK
    n = w.shape[1] if transpose_rhs else w.shape[2]
    groups, used, num_chunks, n_used = _chunked_blocks(layout, c)
    xb = jnp.pad(x.reshape(nb, bs, x.shape[1]), ((0, num_chunks * c - nb), (0, 0), (0, 0)))
    spec = "cbk,cnk->cbn" if transpose_rhs else "cbk,ckn->cbn"

    def body(i, out):
        xk = jax.lax.dynamic_slice_in_dim(xb, i * c, c)
        wk = jnp.take(w, jax.lax.dynamic_slice_in_dim(groups, i * c, c), axis=0)
        y = jnp.einsum(spec, xk, wk, preferred_element_type=jnp.float32)
        keep = jax.lax.dynamic_slice_in_dim(used, i * c, c)[:, None, None]
        y = jnp.where(keep, y, 0.0).astype(x.dtype)
        return jax.lax.dynamic_update_slice_in_dim(out, y, i * c, 0)

    # zeros_like (not zeros) so the carry inherits x's varying mesh axes under shard_map
    out = jnp.zeros_like(x, shape=(num_chunks * c, bs, n))
    out = jax.lax.fori_loop(0, n_used, body, out)
    return out[:nb].reshape(nb * bs, n)


def _tgmm_xla(x, dy, layout, block_size):
    nb, bs, c = layout.num_blocks, block_size, _XLA_CHUNK
    groups, used, num_chunks, n_used = _chunked_blocks(layout, c)
    pad = ((0, num_chunks * c - nb), (0, 0), (0, 0))
    xb = jnp.pad(x.reshape(nb, bs, x.shape[1]), pad)
    dyb = jnp.pad(dy.reshape(nb, bs, dy.shape[1]), pad)

    def body(i, dw):
        xk = jax.lax.dynamic_slice_in_dim(xb, i * c, c)
        dk = jax.lax.dynamic_slice_in_dim(dyb, i * c, c)
        upd = jnp.einsum("cbk,cbn->ckn", xk, dk, preferred_element_type=jnp.float32)
        keep = jax.lax.dynamic_slice_in_dim(used, i * c, c)[:, None, None]
        g = jax.lax.dynamic_slice_in_dim(groups, i * c, c)
        return dw.at[g].add(jnp.where(keep, upd, 0.0))

    dw = jnp.zeros_like(x, dtype=jnp.float32, shape=(layout.num_groups, x.shape[1], dy.shape[1]))
    return jax.lax.fori_loop(0, n_used, body, dw)


def _gmm_pallas(x, w, layout, block_size, transpose_rhs, interpret):
    from modjax.kernels import pallas_gmm

    return pallas_gmm.gmm(
        x, w, layout, block_size=block_size, transpose_rhs=transpose_rhs, interpret=interpret
    )


def _tgmm_pallas(x, dy, layout, block_size, interpret):
    from modjax.kernels import pallas_gmm

    return pallas_gmm.tgmm(x, dy, layout, block_size=block_size, interpret=interpret)


def _gmm_impl(x, w, layout, block_size, transpose_rhs, impl, interpret):
    impl = _pick(impl, "gmm", x, w, block_size, interpret, transpose_rhs)
    if impl == "reference":
        return _gmm_reference(x, w, layout, block_size, transpose_rhs)
    if impl == "xla":
        return _gmm_xla(x, w, layout, block_size, transpose_rhs)
    if impl == "mgpu":
        return mgpu_gmm.gmm(x, w, layout, block_size=block_size, transpose_rhs=transpose_rhs)
    return _gmm_pallas(x, w, layout, block_size, transpose_rhs, interpret)


def _tgmm_impl(x, dy, layout, block_size, impl, interpret, out_dtype=jnp.float32):
    """float32 accumulation, rounded once to ``out_dtype`` (the gradient's dtype: the
    Hopper kernels round in their epilogue, sparing a float32 ``[G, K, N]`` in memory)."""
    impl = _pick(impl, "tgmm", x, dy, block_size, interpret)
    if impl == "mgpu":
        return mgpu_gmm.tgmm(x, dy, layout, block_size=block_size, out_dtype=out_dtype)
    if impl == "reference":
        out = _tgmm_reference(x, dy, layout, block_size)
    elif impl == "xla":
        out = _tgmm_xla(x, dy, layout, block_size)
    else:
        out = _tgmm_pallas(x, dy, layout, block_size, interpret)
    return out.astype(out_dtype)


# --------------------------------------------------------------------------------------
# public API with custom gradients


def gmm(
    x: Array,
    w: Array,
    layout: GroupLayout,
    *,
    block_size: int,
    transpose_rhs: bool = False,
    impl: str = "auto",
    interpret: bool = False,
) -> Array:
    """Grouped matmul on a block-padded operand: ``out[rows of g] = x[rows of g] @ w[g]``.

    Args:
      x: ``[Nb * block_size, K]`` rows in block-padded layout (see :func:`sort_to_blocks`).
      w: ``[G, K, N]`` per-group weights (``[G, N, K]`` with ``transpose_rhs``).
      layout: the :class:`GroupLayout` of ``x``.
      block_size: rows per block (static).
      transpose_rhs: multiply by ``w[g].T`` instead.
      impl: ``"auto"``, ``"reference"``, ``"xla"``, ``"pallas"`` or ``"mgpu"``.
      interpret: run Pallas kernels in interpret mode (any backend; for tests).

    Returns:
      ``[Nb * block_size, N]`` in ``x.dtype``; rows of unused blocks are zero.
    """
    _check_gmm(x, w, layout, block_size, transpose_rhs)
    impl = _check_impl(impl)
    return _gmm_vjp(x, w, layout, block_size, transpose_rhs, impl, interpret)


def tgmm(
    x: Array,
    dy: Array,
    layout: GroupLayout,
    *,
    block_size: int,
    impl: str = "auto",
    interpret: bool = False,
) -> Array:
    """Per-group ``x^T dy``: float32 ``[G, K, N]`` from ``x [Mp, K]`` and ``dy [Mp, N]``.

    Groups with no rows get zeros. This is the weight gradient of :func:`gmm`.
    """
    _check_block_size(block_size)
    _check_dtype("x", x)
    _check_dtype("dy", dy)
    if x.shape[0] != dy.shape[0] or x.shape[0] != layout.num_blocks * block_size:
        raise ValueError(f"x {x.shape} and dy {dy.shape} must both have Nb * block_size rows")
    impl = _check_impl(impl)
    return _tgmm_impl(x, dy, layout, block_size, impl, interpret)


@jax.custom_vjp
def _gmm_core(x, w, layout, static):
    block_size, transpose_rhs, impl, interpret = static
    return _gmm_impl(x, w, layout, block_size, transpose_rhs, impl, interpret)


def _gmm_vjp(x, w, layout, block_size, transpose_rhs, impl, interpret):
    return _gmm_core(x, w, layout, _Static(block_size, transpose_rhs, impl, interpret))


class _Static(NamedTuple):
    block_size: int
    transpose_rhs: bool
    impl: str
    interpret: bool


# The static settings travel as a pytree with no leaves so custom_vjp sees them as
# constants (nondiff_argnums would also work but forbids keyword use).
jax.tree_util.register_pytree_node(_Static, lambda s: ((), tuple(s)), lambda aux, _: _Static(*aux))


def _gmm_bwd(res, dy):
    x, w, layout, static = res
    block_size, transpose_rhs, impl, interpret = static
    dy = dy.astype(x.dtype)
    dx = _gmm_impl(dy, w, layout, block_size, not transpose_rhs, impl, interpret)
    dw = _tgmm_impl(x, dy, layout, block_size, impl, interpret, out_dtype=w.dtype)
    if transpose_rhs:
        dw = jnp.swapaxes(dw, 1, 2)
    return dx, dw, None, None


def _gmm_fwd(x, w, layout, static):
    return _gmm_core(x, w, layout, static), (x, w, layout, static)


_gmm_core.defvjp(_gmm_fwd, _gmm_bwd)
