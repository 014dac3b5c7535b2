"""Top-k token-choice routing with optional capacity and batch-priority routing.

Each token picks its k best experts (Shazeer et al. 2017, "Outrageously Large Neural
Networks"); with a capacity, each expert accepts at most C assignments and drops the
rest (GShard, Lepikhin et al. 2021; Switch, Fedus et al. 2022). Assignments queue in
priority order: all first choices before any second choice, and within a choice either
token order or, with ``batch_priority``, descending top-1 probability (Riquelme et al.
2021, "Scaling Vision with Sparse Mixture of Experts").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from modjax.routing import checks
from modjax.routing.groups import map_groups
from modjax.routing.types import Routing
from modjax.typing import Array


def queue_slots(
    expert_index: Array, num_experts: int, *, order: Array | None = None, valid: Array | None = None
) -> Array:
    """Position of each assignment in its expert's queue.

    Assignments queue choice-major (every token's choice 0, then choice 1, ...), tokens
    within a choice in ``order``. Invalid tokens take no place in any queue (slot 0).

    Args:
      expert_index: int ``[T, K]`` experts in ``[0, E)``.
      num_experts: E.
      order: int ``[T]`` permutation of tokens, highest priority first (default 0..T-1).
      valid: bool ``[T]``: tokens that take part (default all).
    Returns:
      int32 ``[T, K]`` slots, ``0 <= slot < T * K``.
    """
    t, k = expert_index.shape
    if order is None:
        order = jnp.arange(t)
    one_hot = jax.nn.one_hot(expert_index[order], num_experts, dtype=jnp.int32)  # [T, K, E]
    if valid is not None:
        one_hot = one_hot * valid[order].astype(jnp.int32)[:, None, None]
    flat = jnp.swapaxes(one_hot, 0, 1).reshape(k * t, num_experts)
    position = jnp.cumsum(flat, axis=0) - 1
    position = jnp.swapaxes(position.reshape(k, t, num_experts), 0, 1)
    slot_sorted = jnp.sum(position * one_hot, axis=-1)
    return jnp.zeros_like(slot_sorted).at[order].set(slot_sorted).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("capacity",))
def routing_from_choices(
    expert_index: Array,
    weight: Array,
    probs: Array,
    *,
    capacity: int | None,
    priority: Array | None = None,
    valid: Array | None = None,
) -> Routing:
    """A :class:`Routing` from per-token choices: queue slots, capacity drops, weights.

    Args:
      expert_index: int ``[T, K]`` chosen experts (in ``[0, E)``).
      weight: float ``[T, K]`` combine weights before dropping.
      probs: float32 ``[T, E]`` router probabilities (E is read from here).
      capacity: C slots per expert, or None for dropless.
      priority: float ``[T]``: higher queues first (stable; default token order).
      valid: bool ``[T]``: tokens that may be routed at all (default all).
    Returns:
      the Routing; assignments past capacity or of invalid tokens have kept False and
      weight 0.
    """
    num_experts = probs.shape[-1]
    order = None if priority is None else jnp.argsort(-priority, stable=True)
    slot = queue_slots(expert_index, num_experts, order=order, valid=valid)
    kept = jnp.ones(expert_index.shape, bool) if valid is None else valid[:, None]
    kept = jnp.broadcast_to(kept, expert_index.shape)
    if capacity is not None:
        kept = kept & (slot < capacity)
    weight = jnp.where(kept, weight.astype(jnp.float32), 0.0)
    return Routing(
        expert_index=expert_index.astype(jnp.int32),
        weight=weight,
        kept=kept,
        slot=slot,
        probs=probs.astype(jnp.float32),
        num_experts=num_experts,
        capacity=capacity,
    )


def select_top_k(
    selection_scores: Array,
    probs: Array,
    k: int,
    *,
    capacity: int | None,
    batch_priority: bool,
    renormalize: bool,
) -> Routing:
    """Top-k of ``selection_scores`` ``[T, E]``, weighted by ``probs`` ``[T, E]``.

    The core of :func:`top_k_routing` (also used by balanced routing, which selects by
    a Sinkhorn plan). Tokens with a NaN score are dropped.
    """
    valid = ~jnp.any(jnp.isnan(selection_scores), axis=-1) & ~jnp.any(jnp.isnan(probs), -1)
    scores = jnp.where(jnp.isnan(selection_scores), -jnp.inf, selection_scores)
    _, expert_index = jax.lax.top_k(scores, k)  # ties: the lower expert index first
    chosen = jnp.take_along_axis(probs, expert_index, axis=-1)
    weight = chosen
    if renormalize and k > 1:
        weight = chosen / jnp.maximum(chosen.sum(-1, keepdims=True), 1e-9)
    priority = jnp.where(valid, chosen[:, 0], -jnp.inf) if batch_priority else None
    return routing_from_choices(
        expert_index, weight, probs, capacity=capacity, priority=priority, valid=valid
    )


def top_k_routing(
    logits: Array,
    k: int,
    *,
    capacity_factor: float | None = None,
    capacity: int | None = None,
    batch_priority: bool = False,
    bias: Array | None = None,
    renormalize: bool = True,
) -> Routing:
    """Top-k token-choice routing: each token picks the k experts with the best scores.

    ``probs = softmax(logits)`` in float32. Selection uses ``logits + bias`` (the
    auxiliary-loss-free balancing bias of Wang et al. 2024, selection only); combine
    weights use the unbiased probs of the chosen experts, renormalized over the k choices
    when ``renormalize`` and k > 1 (with k = 1 the weight is the top-1 probability, as
    in Switch, so that the router gets a gradient).

    Capacity: ``capacity`` slots per expert, or ``ceil(capacity_factor * T * k / E)``,
    or dropless (every assignment kept, ``Routing.capacity`` None) when both are None.
    Slots are queue positions, choice 0 of all tokens first, then choice 1, ...; within
    a choice in token order, or by descending top-1 probability with ``batch_priority``
    (Riquelme et al. 2021). Dropped assignments have ``kept`` False and weight 0.

    Leading axes of ``logits`` are groups: each group is routed on its own (capacity is
    per group), through ``jax.vmap``; see :mod:`modjax.routing.groups`.

    Ties pick the lower expert index. A token with a NaN logit is dropped (all k
    assignments ``kept`` False, weight 0, indices still in ``[0, E)``, no slot taken);
    its ``probs`` row stays NaN so that losses and metrics show the fault.

    Args:
      logits: float ``[..., T, E]`` router scores.
      k: experts per token, ``1 <= k <= E``.
      capacity_factor: > 0, or None.
      capacity: slots per expert, > 0, or None (not with ``capacity_factor``).
      batch_priority: queue tokens by their top-1 probability instead of position.
      bias: float ``[E]`` added to the logits for selection only, or None.
      renormalize: make the k kept-or-not weights of a token sum to 1 (k > 1).
    Returns:
      a :class:`Routing` with ``[..., T, K]`` fields and ``probs [..., T, E]``.

    Example:
      >>> r = top_k_routing(jnp.zeros((8, 4)), 2, capacity_factor=1.0)
      >>> r.expert_index.shape, r.capacity
      ((8, 2), 4)
    """
    logits = checks.check_scores("logits", logits)
    t, e = logits.shape[-2:]
    k = checks.check_k(k, e)
    cap = checks.resolve_capacity(t, e, k, capacity_factor, capacity)
    if bias is not None:
        bias = checks.check_scores("bias", bias, min_rank=1, num_experts=e)
        if bias.ndim != 1:
            raise ValueError(f"bias must have shape ({e},), got {bias.shape}")
    return _top_k_impl(
        logits, bias, k=k, capacity=cap, batch_priority=batch_priority, renormalize=renormalize
    )


# jitted so that eager calls compile once instead of op by op (inlined under an outer jit)
@functools.partial(jax.jit, static_argnames=("k", "capacity", "batch_priority", "renormalize"))
def _top_k_impl(logits, bias, *, k, capacity, batch_priority, renormalize) -> Routing:
    logits = logits.astype(jnp.float32)
    cap = capacity

    def route(lg: Array) -> Routing:
        probs = jax.nn.softmax(lg, axis=-1)
        selection = lg if bias is None else lg + jax.lax.stop_gradient(bias.astype(jnp.float32))
        return select_top_k(
            selection,
            probs,
            k,
            capacity=cap,
            batch_priority=batch_priority,
            renormalize=renormalize,
        )

    return map_groups(route, logits.ndim - 2, logits)
