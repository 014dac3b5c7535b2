"""Apply any routing decision to token representations: dispatch to and combine from
per-expert buffers ``[E, C, D]``.

* :class:`~modjax.routing.types.Routing`: put token t's row into slot
  ``(expert_index[t, k], slot[t, k])`` of the buffer where ``kept`` (C is the routing's
  capacity, or T when dropless), and read it back weighted by ``weight``. Both directions
  and both of their gradients are gathers (the slot -> assignment map inverts the
  assignment -> slot map), never scatter-adds; :func:`dispatch_reference` and
  :func:`combine_reference` are the plain scatter/indexing twins the tests hold equal.
* :class:`~modjax.routing.types.DenseRouting`: the einsums of GShard (Lepikhin et al.
  2021) and Soft MoE (Puigcerver et al. 2023), ``"tec,td->ecd"`` and ``"tec,ecd->td"``.

Leading axes of ``x`` are the routing's groups (vmapped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from modjax.kernels import grouped_matmul as gm
from modjax.routing.groups import map_groups
from modjax.routing.types import DenseRouting, Routing
from modjax.typing import Array


def _check(name: str, x, routing, inner) -> None:
    """``x`` must be ``lead + inner(routing) + (D,)``, lead the routing's group axes."""
    if not isinstance(routing, Routing | DenseRouting):
        raise TypeError(f"routing must be a Routing or DenseRouting, got {type(routing).__name__}")
    if not hasattr(x, "ndim"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if routing.probs.ndim < 2:
        raise ValueError(f"routing.probs must be [..., T, E], got shape {routing.probs.shape}")
    want = _routing_lead(routing) + inner(routing)
    if x.ndim != len(want) + 1 or x.shape[:-1] != want:
        raise ValueError(
            f"{name} must have shape {want} + (D,) to match the routing, got {x.shape}"
        )


def _tokens(routing) -> tuple[int, ...]:
    return (routing.probs.shape[-2],)


def _buffers(routing) -> tuple[int, ...]:
    if isinstance(routing, DenseRouting):
        return (routing.num_experts, routing.capacity)
    return (routing.num_experts, routing.buffer_capacity())


def _routing_lead(routing) -> tuple[int, ...]:
    return routing.probs.shape[:-2]


def dispatch(x: Array, routing: Routing | DenseRouting) -> Array:
    """Token rows into per-expert buffers: ``[..., T, D] -> [..., E, C, D]``.

    Args:
      x: ``[..., T, D]`` token representations; leading axes equal the routing's.
      routing: a Routing (C = ``buffer_capacity()``) or a DenseRouting (C its last axis).
    Returns:
      ``[..., E, C, D]`` buffers; empty slots are zero. Dtype of ``x``.
    """
    _check("x", x, routing, _tokens)
    return _dispatch_impl(x, routing)


@jax.jit
def _dispatch_impl(x: Array, routing: Routing | DenseRouting) -> Array:
    lead = _routing_lead(routing)
    if isinstance(routing, DenseRouting):
        return jnp.einsum("...tec,...td->...ecd", routing.dispatch.astype(x.dtype), x)
    e, c = routing.num_experts, routing.buffer_capacity()

    def one(xg, idx, slot, kept):
        position, source, placed = slot_maps(idx, slot, kept, e, c)
        return gm.to_blocks(xg, source, position, placed, idx.shape[1]).reshape(e, c, -1)

    return map_groups(one, len(lead), x, routing.expert_index, routing.slot, routing.kept)


def dispatch_reference(x: Array, routing: Routing) -> Array:
    """:func:`dispatch` of a sparse Routing as a scatter-add (its gradient is a gather and
    its transpose a scatter-add): the reference twin of the gather-only path."""
    e, c = routing.num_experts, routing.buffer_capacity()

    def one(xg, idx, slot, kept):
        rows = jnp.broadcast_to(xg[:, None, :], idx.shape + xg.shape[-1:])
        slot = jnp.where(kept, slot, c)  # out of range: dropped by mode="drop"
        buf = jnp.zeros((e, c, xg.shape[-1]), xg.dtype)
        return buf.at[idx, slot].add(rows, mode="drop")

    lead = _routing_lead(routing)
    return map_groups(one, len(lead), x, routing.expert_index, routing.slot, routing.kept)


def slot_maps(
    expert_index: Array, slot: Array, kept: Array, num_experts: int, capacity: int
) -> tuple[Array, Array, Array]:
    """Where one group's assignments go in its ``[E * C]`` buffer slots, both ways.

    Args:
      expert_index, slot, kept: ``[T, K]`` of a :class:`Routing` (one group).
      num_experts, capacity: ``E`` and the buffer capacity ``C``.
    Returns:
      ``(position, source, placed)``: ``position [T*K]`` each assignment's slot (0 where
      not placed), ``source [E*C]`` each slot's assignment (``T*K`` where empty), and
      ``placed [T*K]`` (kept and within capacity). Each placed assignment owns one slot,
      so the two maps invert each other and the row moves of
      :func:`modjax.kernels.grouped_matmul.to_blocks` / ``from_blocks`` are gathers both
      ways and in both gradients.
    """
    e, c = num_experts, capacity
    placed = (kept & (slot >= 0) & (slot < c)).reshape(-1)
    flat = jnp.where(placed, (expert_index * c + slot).reshape(-1), e * c).astype(jnp.int32)
    n = flat.shape[0]
    source = jnp.full((e * c + 1,), n, jnp.int32).at[flat].set(jnp.arange(n, dtype=jnp.int32))
    return jnp.where(placed, flat, 0), source[: e * c], placed


def combine(expert_out: Array, routing: Routing | DenseRouting) -> Array:
    """Per-expert outputs back to tokens, weighted: ``[..., E, C, D] -> [..., T, D]``.

    ``y[t] = sum_k weight[t, k] * expert_out[expert_index[t, k], slot[t, k]]`` over kept
    assignments (Routing), or ``sum_{e,c} combine[t, e, c] * expert_out[e, c]``
    (DenseRouting). Dropped assignments add exactly zero (even if the slot holds NaN).

    Args:
      expert_out: ``[..., E, C, D]`` expert outputs per slot.
      routing: the decision that made the buffers.
    Returns:
      ``[..., T, D]`` in the dtype of ``expert_out``.
    """
    _check("expert_out", expert_out, routing, _buffers)
    return _combine_impl(expert_out, routing)


@jax.jit
def _combine_impl(expert_out: Array, routing: Routing | DenseRouting) -> Array:
    lead = _routing_lead(routing)
    if isinstance(routing, DenseRouting):
        return jnp.einsum(
            "...tec,...ecd->...td", routing.combine.astype(expert_out.dtype), expert_out
        )
    e, c = routing.num_experts, routing.buffer_capacity()

    def one(out, idx, slot, kept, weight):
        position, source, placed = slot_maps(idx, slot, kept, e, c)
        rows = gm.from_blocks(out.reshape(e * c, -1), position, source, placed)
        rows = rows.reshape(idx.shape + (-1,))
        return _weighted_sum(rows, kept, weight, out.dtype)

    return map_groups(
        one, len(lead), expert_out, routing.expert_index, routing.slot, routing.kept, routing.weight
    )


def _weighted_sum(rows: Array, kept: Array, weight: Array, dtype) -> Array:
    """``sum_k weight * rows`` over kept assignments, in float32 (a dropped assignment
    adds exactly zero even if its row is NaN)."""
    w = weight.astype(jnp.float32)[..., None]
    contrib = jnp.where(kept[..., None], rows.astype(jnp.float32) * w, 0.0)
    return contrib.sum(axis=1).astype(dtype)


def combine_reference(expert_out: Array, routing: Routing) -> Array:
    """:func:`combine` of a sparse Routing by plain indexing (whose gradient is a
    scatter-add): the reference twin of the gather-only path."""
    c = routing.buffer_capacity()

    def one(out, idx, slot, kept, weight):
        placed = kept & (slot < c)
        return _weighted_sum(out[idx, jnp.where(placed, slot, 0)], placed, weight, out.dtype)

    lead = _routing_lead(routing)
    return map_groups(
        one, len(lead), expert_out, routing.expert_index, routing.slot, routing.kept, routing.weight
    )


__all__ = ["combine", "combine_reference", "dispatch", "dispatch_reference", "slot_maps"]
