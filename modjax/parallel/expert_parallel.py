"""Expert parallelism: tokens travel to the devices that hold their experts.

Experts (any pytree of per-expert parameters with a leading E axis: FFN weights, LoRA
factors, adapters) are split over the ``expert`` mesh axis; tokens are split over the
batch axes ``(data, fsdp, expert)``. Inside one ``jax.shard_map`` every device

1. sorts its local (token, choice) assignments by global expert, which also orders them
   by destination device and, within a destination, by local expert;
2. packs them into a fixed-size send buffer ``[ep, B, D]`` (B rows per destination) and
   exchanges it, and the per-expert row counts, with ``jax.lax.all_to_all`` over the
   expert axis;
3. regroups the ``ep * B`` received rows by local expert and runs ``expert_fn`` once, as
   a grouped matmul over its local experts (``jax.lax.ragged_dot`` in the stock
   ``expert_fn`` builders of :mod:`modjax.parallel.experts`);
4. sends the results back with the reverse ``all_to_all`` to the same buffer positions
   and combines them with the routing weights.

Dropless by default: ``B`` is the worst case (every local assignment bound for one
device), so nothing can overflow. A smaller buffer (``capacity_factor`` or
``buffer_size``) saves memory and bandwidth; assignments that do not fit are never
dropped silently: they are counted in :class:`ExpertParallelStats` (``overflow="count"``,
their contribution is zero) or stop the program (``overflow="error"``).

The sizes ``B`` and ``ep`` are static, so the whole exchange is a fixed-shape program:
``ragged_all_to_all`` would send only the used rows, but it does not run on CPU.

Other mesh axes: tokens are replicated over ``tensor`` (each tensor rank repeats the
work) and expert weights enter whole on every device of their expert shard (weights
sharded over ``fsdp``/``tensor`` are all-gathered at the shard_map boundary, and their
gradients reduce-scattered back, ZeRO-3 style).

How a layer dispatches here (the mesh decides; model code is the same on every mesh)::

    if use_expert_parallel():                    # mesh set with jax.set_mesh
        y, stats = expert_parallel_apply(x2, routing, expert_fn, params)
    else:
        y = local_dropless_moe(x2, routing, params)

with ``x2 [T, D]`` (leading axes flattened), ``routing`` a flat :class:`Routing` and
``params`` the stacked ``[E, ...]`` expert weights; ``modjax.layers.moe.MoE`` does this
with ``modjax.computation.ffn.make_expert_fn``.

Fast path / reference twin: :func:`expert_parallel_apply` and
:func:`expert_parallel_reference` (every token through every expert, on one device);
tests hold them equal for values and gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from modjax.kernels import grouped_matmul as gm
from modjax.routing.types import Routing
from modjax.sharding import DEFAULT_RULES, logical_to_spec
from modjax.typing import Array, PyTree

#: ``expert_fn(local_params, x [N, D], group_sizes int32 [E_local]) -> [N, D]``.
#: Rows of ``x`` are sorted by local expert: the first ``group_sizes[0]`` rows go to local
#: expert 0, and so on; rows past ``sum(group_sizes)`` are padding (their output is unused).
ExpertFn = Callable[[PyTree, Array, Array], Array]

OVERFLOW_POLICIES: tuple[str, ...] = ("count", "error")


class ExpertParallelStats(NamedTuple):
    """Counters of one expert-parallel exchange (global: summed over all devices).

    Attributes:
      assignments: int32: kept (token, choice) assignments routed.
      overflow: int32: assignments that did not fit the send buffer (contributed zero).
      max_pair_load: int32: most assignments one device wanted to send to one device:
        a buffer of this many rows per destination would have been dropless.
      buffer_size: int32: rows per destination in the send buffer (B).
    """

    assignments: Array
    overflow: Array
    max_pair_load: Array
    buffer_size: Array


def use_expert_parallel(mesh: jax.sharding.Mesh | None = None, expert_axis: str = "expert") -> bool:
    """Whether a layer should take the expert-parallel path on this mesh.

    True when the mesh (or, if None, the mesh set with ``jax.set_mesh``) has an
    ``expert_axis`` of size > 1. Model code never changes: the mesh decides.
    """
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return False
    return mesh.shape.get(expert_axis, 1) > 1


def token_axes(
    mesh: jax.sharding.Mesh, rules=DEFAULT_RULES, batch_axis: str = "batch"
) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that tokens are split over, from the logical rules."""
    entry = logical_to_spec((batch_axis,), rules, mesh)[0]
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def send_buffer_size(
    tokens_per_device: int,
    k: int,
    expert_parallelism: int,
    capacity_factor: float | None = None,
) -> int:
    """Rows per destination device in the send buffer.

    ``None`` gives the dropless worst case ``tokens_per_device * k`` (every local
    assignment bound for one device); a factor c gives ``ceil(c * average)`` with
    ``average = tokens_per_device * k / expert_parallelism``, at most the worst case.
    """
    worst = tokens_per_device * k
    if capacity_factor is None:
        return max(worst, 1)
    return max(1, min(worst, math.ceil(capacity_factor * worst / expert_parallelism)))


def _check_args(x, routing, expert_params, mesh, expert_axis, overflow, capacity_factor):
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must be [T, D], got shape {x.shape}")
    if routing.expert_index.shape[0] != x.shape[0]:
        raise ValueError(
            f"routing.expert_index {routing.expert_index.shape} must have T={x.shape[0]} "
            "rows, like x"
        )
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if capacity_factor is not None and not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor!r}")
    if mesh is None or mesh.empty:
        raise ValueError("mesh must be given (or set with jax.set_mesh), got no mesh")
    if expert_axis not in mesh.shape:
        raise ValueError(f"expert_axis {expert_axis!r} is not a mesh axis of {dict(mesh.shape)}")
    ep = mesh.shape[expert_axis]
    if routing.num_experts % ep:
        raise ValueError(
            f"routing.num_experts={routing.num_experts} must be divisible by the "
            f"{expert_axis!r} mesh axis size {ep}"
        )
    for path, leaf in jax.tree_util.tree_leaves_with_path(expert_params):
        if leaf.ndim == 0 or leaf.shape[0] != routing.num_experts:
            raise ValueError(
                f"expert_params{jax.tree_util.keystr(path)} must have a leading axis of "
                f"num_experts={routing.num_experts}, got shape {leaf.shape}"
            )


def expert_parallel_apply(
    x: Array,
    routing: Routing,
    expert_fn: ExpertFn,
    expert_params: PyTree,
    *,
    mesh: jax.sharding.Mesh | None = None,
    expert_axis: str = "expert",
    batch_axes: Sequence[str] | None = None,
    capacity_factor: float | None = None,
    buffer_size: int | None = None,
    overflow: str = "count",
    check_vma: bool = False,
) -> tuple[Array, ExpertParallelStats]:
    """``y[t] = sum_k weight[t, k] * expert_fn_{expert_index[t, k]}(x[t])`` with experts split
    over devices; tokens travel by all-to-all (see the module docstring).

    Args:
      x: ``[T, D]`` tokens (global view; split over ``batch_axes`` inside).
      routing: a :class:`Routing` over E experts (``kept`` False skips an assignment).
      expert_fn: ``(local_params, x [N, D], group_sizes [E_local]) -> [N, D]``, a grouped
        computation over the local experts (see :data:`ExpertFn`).
      expert_params: pytree whose leaves all have a leading E axis; split over
        ``expert_axis`` (E must be divisible by its size).
      mesh: the device mesh (default: the one set with ``jax.set_mesh``).
      expert_axis: mesh axis the experts are split over.
      batch_axes: mesh axes the tokens are split over (default: the logical ``batch``
        rule, size-1 axes left out). T must be divisible by their total size.
      capacity_factor: send buffer = ``ceil(factor * average rows per destination)``;
        None (default) sizes it for the worst case: dropless.
      buffer_size: explicit rows per destination (overrides ``capacity_factor``).
      overflow: ``"count"``: assignments that do not fit contribute zero and are counted
        in the stats; ``"error"``: any overflow raises at run time.
      check_vma: ``jax.shard_map``'s typing of which values vary over which mesh axes.
        Off by default because loop-based grouped matmuls (``fori_loop`` carries that
        start from ``jnp.zeros``) do not type-check under it; gradients are the same
        either way here (tests hold both equal to the reference): every input enters
        sharded or is summed over the axes it is replicated on by shard_map's
        transpose, and the body's only reductions are integer counters.

    Returns:
      ``(y [T, D] in x.dtype, ExpertParallelStats)``.
    """
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    _check_args(x, routing, expert_params, mesh, expert_axis, overflow, capacity_factor)
    if batch_axes is None:
        batch_axes = token_axes(mesh)
    batch_axes = tuple(batch_axes)
    for a in batch_axes:
        if a not in mesh.shape:
            raise ValueError(f"batch_axes entry {a!r} is not a mesh axis of {dict(mesh.shape)}")
    if mesh.shape[expert_axis] == 1 and expert_axis not in batch_axes:
        # The all-to-alls make the outputs vary over the (size-1) expert axis: name it.
        batch_axes = (*batch_axes, expert_axis)
    if expert_axis not in batch_axes:
        raise ValueError(
            f"batch_axes={batch_axes} must include expert_axis {expert_axis!r}: tokens are "
            "split over the expert axis too"
        )
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    num_tokens, _ = x.shape
    if num_tokens % shards:
        raise ValueError(
            f"x has T={num_tokens} tokens, not divisible by the {shards} token shards of "
            f"batch_axes={batch_axes}"
        )
    ep = mesh.shape[expert_axis]
    num_experts = routing.num_experts
    tokens_local = num_tokens // shards
    if buffer_size is None:
        buffer_size = send_buffer_size(tokens_local, routing.k, ep, capacity_factor)
    elif not isinstance(buffer_size, int) or buffer_size < 1:
        raise ValueError(f"buffer_size must be a positive int or None, got {buffer_size!r}")

    token_spec = P(batch_axes or None, None)
    param_specs = jax.tree.map(lambda _: P(expert_axis), expert_params)
    stat_axes = tuple(dict.fromkeys((*batch_axes, expert_axis)))

    def local(x, expert_index, weight, kept, params):
        y, stats = _dispatch_compute_combine(
            x,
            expert_index,
            weight,
            kept,
            params,
            expert_fn=expert_fn,
            num_experts=num_experts,
            ep=ep,
            buffer_size=buffer_size,
            expert_axis=expert_axis,
        )
        assignments, dropped, max_pair = stats
        stats = ExpertParallelStats(
            assignments=jax.lax.psum(assignments, batch_axes) if batch_axes else assignments,
            overflow=jax.lax.psum(dropped, batch_axes) if batch_axes else dropped,
            max_pair_load=jax.lax.pmax(max_pair, stat_axes),
            buffer_size=jnp.int32(buffer_size),
        )
        return y, stats

    stat_specs = ExpertParallelStats(P(), P(), P(), P())
    # jit: eager shard_map would dispatch op by op (slow); under an outer jit it inlines.
    y, stats = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(token_spec, token_spec, token_spec, token_spec, param_specs),
            out_specs=(token_spec, stat_specs),
            check_vma=check_vma,
        )
    )(x, routing.expert_index, routing.weight, routing.kept, expert_params)
    if overflow == "error":
        jax.debug.callback(_raise_on_overflow, stats.overflow, stats.max_pair_load, buffer_size)
    return y, stats


def _raise_on_overflow(dropped, max_pair_load, buffer_size):
    if int(dropped) > 0:
        raise OverflowError(
            f"expert-parallel send buffer overflowed: {int(dropped)} assignments did not fit "
            f"buffer_size={buffer_size} rows per destination (needed {int(max_pair_load)})"
        )


def _exclusive_cumsum(v: Array, axis: int = -1) -> Array:
    return jnp.cumsum(v, axis=axis) - v


def _dispatch_compute_combine(
    x, expert_index, weight, kept, params, *, expert_fn, num_experts, ep, buffer_size, expert_axis
):
    """The per-device body: sort, pack, all_to_all, grouped compute, all_to_all, combine."""
    tokens, k = expert_index.shape
    d = x.shape[-1]
    local_experts = num_experts // ep
    num_assign = tokens * k
    rows = ep * buffer_size

    # 1. Sort assignments by global expert; skipped ones get key E and sort last.
    active = kept.reshape(num_assign)
    key = jnp.where(active, expert_index.reshape(num_assign), num_experts)
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    sorted_active = active[order]
    counts = jnp.bincount(key, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    counts_by_dest = counts.reshape(ep, local_experts)
    dest_counts = counts_by_dest.sum(1)
    dest = jnp.minimum(sorted_key // local_experts, ep - 1)
    pos = jnp.arange(num_assign, dtype=jnp.int32) - _exclusive_cumsum(dest_counts)[dest]
    fits = sorted_active & (pos < buffer_size)
    send_row = jnp.where(fits, dest * buffer_size + pos, rows)  # `rows` = out of bounds

    # 2. Pack and exchange. Rows of one destination are sorted by local expert, so the
    # first min(B, ...) of each expert's run are the ones that fit. In assignment order
    # (token-major): `row_of` is each assignment's send row, `assign_of` each send row's
    # assignment (num_assign: empty); the moves have gather-only gradients.
    row_of = jnp.zeros((num_assign,), jnp.int32).at[order].set(jnp.where(fits, send_row, 0))
    fits_of = jnp.zeros((num_assign,), bool).at[order].set(fits)
    assign_of = jnp.full((rows + 1,), num_assign, jnp.int32).at[send_row].set(order)[:rows]
    send = gm.to_blocks(x, assign_of, row_of, fits_of, k)
    start_in_dest = _exclusive_cumsum(counts_by_dest, axis=1)
    sent_counts = jnp.clip(buffer_size - start_in_dest, 0, counts_by_dest).astype(jnp.int32)
    recv = jax.lax.all_to_all(send, expert_axis, 0, 0, tiled=True)  # [ep * B, D]
    recv_counts = jax.lax.all_to_all(sent_counts, expert_axis, 0, 0, tiled=True)  # [ep, El]

    # 3. Regroup the received rows by local expert (padding rows last) and compute.
    ends = jnp.cumsum(recv_counts, axis=1)  # [ep, El]
    b = jnp.arange(buffer_size, dtype=jnp.int32)
    row_expert = (b[None, :, None] >= ends[:, None, :]).sum(-1).reshape(rows)  # El = pad
    group_order = jnp.argsort(row_expert, stable=True).astype(jnp.int32)
    ungroup = gm.inverse_permutation(group_order)
    group_sizes = recv_counts.sum(0).astype(jnp.int32)
    out_grouped = expert_fn(params, gm.permute_rows(recv, group_order, ungroup), group_sizes)
    if out_grouped.shape != (rows, d):
        raise ValueError(
            f"expert_fn must return [N, D] = {(rows, d)} for x of that shape, got "
            f"{out_grouped.shape}"
        )
    out_recv = gm.permute_rows(out_grouped, ungroup, group_order)

    # 4. Send results back to the same buffer positions and combine.
    back = jax.lax.all_to_all(out_recv, expert_axis, 0, 0, tiled=True)  # [ep * B, D]
    w = jnp.where(kept, weight, 0)
    y = gm.combine_from_blocks(back, w, row_of, assign_of, fits_of, x.dtype)

    num_active = active.sum().astype(jnp.int32)
    dropped = num_active - fits.sum().astype(jnp.int32)
    return y, (num_active, dropped, dest_counts.max().astype(jnp.int32))


def expert_parallel_reference(
    x: Array, routing: Routing, expert_fn: ExpertFn, expert_params: PyTree
) -> Array:
    """Slow single-device twin of :func:`expert_parallel_apply`: every token through every
    expert, weighted by the dense routing weights. ``[T, D] -> [T, D]``."""
    num_tokens = x.shape[0]
    weights = jnp.where(routing.kept, routing.weight, 0).astype(jnp.float32)
    one_hot = jax.nn.one_hot(routing.expert_index, routing.num_experts, dtype=jnp.float32)
    dense = jnp.einsum("tk,tke->te", weights, one_hot)
    y = jnp.zeros(x.shape, jnp.float32)
    for e in range(routing.num_experts):
        params_e = jax.tree.map(lambda p, e=e: p[e : e + 1], expert_params)
        out = expert_fn(params_e, x, jnp.array([num_tokens], jnp.int32))
        y = y + dense[:, e : e + 1] * out.astype(jnp.float32)
    return y.astype(x.dtype)
