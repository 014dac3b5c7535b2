"""Routing granularity and level.

Granularity (Pfeiffer et al. 2023, "Modular Deep Learning", section 4.4): a decision per
token (every router's default), per sequence (route a pooled representation once and
share it with all the sequence's tokens: :func:`pool_tokens` then
:func:`broadcast_routing`), or per task (:func:`~modjax.routing.task.task_routing`, or
Polytropon's task-level skill allocation).

Level: a decision made in each layer (each layer owns a router), or global (one router
at the model's input; its :class:`~modjax.routing.types.Routing` is passed to every
layer, which then all use the same modules for a token).
"""

from __future__ import annotations

import jax.numpy as jnp

from modjax.routing.groups import map_groups
from modjax.routing.top_k import queue_slots
from modjax.routing.types import Routing
from modjax.typing import Array


def pool_tokens(x: Array, mask: Array | None = None) -> Array:
    """Mean over the token axis: ``[..., T, D] -> [..., 1, D]`` (masked tokens excluded).

    Args:
      x: ``[..., T, D]``.
      mask: bool ``[..., T]`` tokens to include (default all); an all-False row pools to 0.
    """
    if x.ndim < 2:
        raise ValueError(f"x must be [..., T, D], got shape {x.shape}")
    if mask is None:
        return x.mean(axis=-2, keepdims=True)
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"mask must have shape {x.shape[:-1]}, got {mask.shape}")
    m = mask.astype(x.dtype)[..., None]
    return (x * m).sum(-2, keepdims=True) / jnp.maximum(m.sum(-2, keepdims=True), 1)


def broadcast_routing(routing: Routing, num_tokens: int) -> Routing:
    """A per-sequence decision ``[..., 1, K]`` shared by the sequence's T tokens.

    The result is dropless (every token of a routed sequence is kept; a dropped
    sequence drops all its tokens) with slots re-counted over the T tokens.

    Args:
      routing: a :class:`Routing` with one token per group (``[..., 1, K]`` fields).
      num_tokens: T >= 1.
    Returns:
      a :class:`Routing` with ``[..., T, K]`` fields and ``probs [..., T, E]``.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a Routing, got {type(routing).__name__}")
    if routing.num_tokens != 1:
        raise ValueError(f"routing must have one token per group, got T={routing.num_tokens}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    lead = routing.probs.shape[:-2]
    grow = lambda a: jnp.broadcast_to(a, lead + (num_tokens,) + a.shape[-1:])
    index, weight, probs = grow(routing.expert_index), grow(routing.weight), grow(routing.probs)
    kept = grow(routing.kept)
    slot = map_groups(
        lambda i, v: queue_slots(i, routing.num_experts, valid=v),
        len(lead),
        index,
        jnp.any(kept, -1),
    )
    return Routing(
        expert_index=index,
        weight=jnp.where(kept, weight, 0.0),
        kept=kept,
        slot=slot,
        probs=probs,
        num_experts=routing.num_experts,
        capacity=None,
    )
