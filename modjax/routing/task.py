"""Fixed routing: a given assignment of tokens to modules, e.g. by task id (task-level
routing of adapters, Pfeiffer et al. 2023, "Modular Deep Learning", section 4.1)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from modjax.routing import checks
from modjax.routing.groups import map_groups
from modjax.routing.top_k import routing_from_choices
from modjax.routing.types import Routing
from modjax.typing import Array


def fixed_routing(
    expert_index: Array,
    num_experts: int,
    *,
    weight: Array | None = None,
    capacity: int | None = None,
    valid: Array | None = None,
) -> Routing:
    """A :class:`Routing` from a given assignment.

    Args:
      expert_index: int ``[..., T, K]`` modules of each token. Values outside
        ``[0, E)`` drop the token (kept False, weight 0, index clipped into range).
      num_experts: E >= 1.
      weight: float ``[..., T, K]`` combine weights (default ``1/K``).
      capacity: slots per expert (queue in token order), or None for dropless.
      valid: bool ``[..., T]`` tokens to route (default all).
    Returns:
      the Routing; ``probs`` is the weight spread as ``[..., T, E]``.
    """
    expert_index = checks.check_ids("expert_index", expert_index)
    if expert_index.ndim < 2:
        raise ValueError(f"expert_index must be [..., T, K], got shape {expert_index.shape}")
    checks.check_positive("num_experts", num_experts, integer=True)
    checks.check_positive("capacity", capacity, allow_none=True, integer=True)
    checks.check_known_in_range("expert_index", expert_index, num_experts)
    if weight is None:
        weight = jnp.full(expert_index.shape, 1.0 / expert_index.shape[-1], jnp.float32)
    elif weight.shape != expert_index.shape:
        raise ValueError(f"weight must have shape {expert_index.shape}, got {weight.shape}")
    return _fixed_impl(expert_index, weight, valid, num_experts=num_experts, capacity=capacity)


@functools.partial(jax.jit, static_argnames=("num_experts", "capacity"))
def _fixed_impl(expert_index, weight, valid, *, num_experts: int, capacity) -> Routing:
    in_range = jnp.all((expert_index >= 0) & (expert_index < num_experts), axis=-1)
    valid = in_range if valid is None else valid & in_range
    index = jnp.clip(expert_index, 0, num_experts - 1)
    weight = jnp.where(valid[..., None], weight.astype(jnp.float32), 0.0)
    one_hot = jnp.eye(num_experts, dtype=jnp.float32)[index]
    probs = jnp.einsum("...tk,...tke->...te", weight, one_hot)

    def route(i, w, p, v):
        return routing_from_choices(i, w, p, capacity=capacity, valid=v)

    return map_groups(route, index.ndim - 2, index, weight, probs, valid)


def task_routing(
    task_ids: Array,
    num_experts: int,
    *,
    task_to_expert: Array | None = None,
    num_tokens: int | None = None,
    capacity: int | None = None,
) -> Routing:
    """Route every token of a task to that task's module(s).

    Task ids known at trace time (concrete arrays) are checked: out of range raises a
    ValueError. Traced ids out of ``[0, N)`` drop their tokens (kept False, weight 0),
    never index out of range.

    Args:
      task_ids: int ``[..., T]`` per token, or ``[...]`` per sequence with ``num_tokens``.
      num_experts: E modules; tasks map to modules by ``task_to_expert``.
      task_to_expert: int ``[N, K]`` modules of each task (default: task n -> module n,
        N = E, K = 1).
      num_tokens: T, to broadcast one id per sequence over its tokens.
      capacity: slots per module, or None (dropless).
    Returns:
      a :class:`Routing` with ``[..., T, K]`` fields, weights ``1/K``.
    """
    task_ids = checks.check_ids("task_ids", task_ids)
    if num_tokens is not None:
        checks.check_positive("num_tokens", num_tokens, integer=True)
        task_ids = jnp.broadcast_to(task_ids[..., None], task_ids.shape + (num_tokens,))
    if task_ids.ndim < 1:
        raise ValueError(f"task_ids must be [..., T] (or give num_tokens), got {task_ids.shape}")
    if task_to_expert is None:
        task_to_expert = jnp.arange(num_experts, dtype=jnp.int32)[:, None]
    task_to_expert = checks.check_ids("task_to_expert", task_to_expert)
    if task_to_expert.ndim != 2:
        raise ValueError(f"task_to_expert must be [N, K], got shape {task_to_expert.shape}")
    num_tasks = task_to_expert.shape[0]
    checks.check_known_in_range("task_ids", task_ids, num_tasks)
    valid = (task_ids >= 0) & (task_ids < num_tasks)
    index = task_to_expert[jnp.clip(task_ids, 0, num_tasks - 1)]
    return fixed_routing(index, num_experts, capacity=capacity, valid=valid)
