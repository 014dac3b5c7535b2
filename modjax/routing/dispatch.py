"""Apply any routing decision to token representations: dispatch to and combine from
per-expert buffers ``[E, C, D]``.

* :class:`~modjax.routing.types.Routing`: scatter token t's row into slot
  ``(expert_index[t, k], slot[t, k])`` of the buffer where ``kept`` (C is the routing's
  capacity, or T when dropless), and gather it back weighted by ``weight``.
* :class:`~modjax.routing.types.DenseRouting`: the einsums of GShard (Lepikhin et al.
  2021) and Soft MoE (Puigcerver et al. 2023), ``"tec,td->ecd"`` and ``"tec,ecd->td"``.

Leading axes of ``x`` are the routing's groups (vmapped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
        rows = jnp.broadcast_to(xg[:, None, :], idx.shape + xg.shape[-1:])
        slot = jnp.where(kept, slot, c)  # out of range: dropped by mode="drop"
        buf = jnp.zeros((e, c, xg.shape[-1]), xg.dtype)
        return buf.at[idx, slot].add(rows, mode="drop")

    return map_groups(one, len(lead), x, routing.expert_index, routing.slot, routing.kept)


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

    def one(out, idx, slot, kept, weight):
        rows = out[idx, jnp.where(kept, slot, 0)]  # [T, K, D]
        w = weight.astype(jnp.float32)[..., None]
        contrib = jnp.where(kept[..., None], rows.astype(jnp.float32) * w, 0.0)
        return contrib.sum(axis=1).astype(out.dtype)

    return map_groups(
        one, len(lead), expert_out, routing.expert_index, routing.slot, routing.kept, routing.weight
    )


__all__ = ["combine", "dispatch"]
