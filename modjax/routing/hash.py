"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): a fixed,
parameter-free map from token id to expert."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from modjax.routing import checks
from modjax.routing.groups import map_groups
from modjax.routing.top_k import routing_from_choices
from modjax.routing.types import Routing
from modjax.typing import Array

_GOLDEN = 0x9E3779B1  # Knuth's multiplicative hash constant, 2^32 / golden ratio


@functools.partial(jax.jit, static_argnames=("num_experts", "seed"))
def hash_expert(token_ids: Array, num_experts: int, *, seed: int = 0) -> Array:
    """int32 ``[...]`` expert of each token id: a multiplicative hash modulo E."""
    h = (token_ids.astype(jnp.uint32) + jnp.uint32(seed)) * jnp.uint32(_GOLDEN)
    h = h ^ (h >> 16)
    return (h % jnp.uint32(num_experts)).astype(jnp.int32)


def hash_routing(
    token_ids: Array,
    num_experts: int,
    *,
    k: int = 1,
    table: Array | None = None,
    capacity: int | None = None,
    seed: int = 0,
) -> Routing:
    """Route each token by its id: expert ``h(id)``, then ``h(id)+1, ...`` for k > 1.

    ``h`` is a fixed multiplicative hash, or a lookup ``table[id]`` (e.g. the balanced
    vocabulary split of Roller et al.). Ids outside ``[0, len(table))`` are clipped into
    range. Weights are ``1/k``; ``probs`` is the one-hot average of the choices, so that
    load metrics work. Dropless unless ``capacity`` is given (queue in token order).

    Args:
      token_ids: int ``[..., T]`` token ids (leading axes are groups).
      num_experts: E >= 1.
      k: experts per token, ``1 <= k <= E`` (k consecutive experts mod E).
      table: int ``[V]`` expert of each vocabulary id, or None for the hash.
      capacity: slots per expert, or None (dropless).
      seed: changes the hash.
    Returns:
      a :class:`Routing` with ``[..., T, K]`` fields.
    """
    token_ids = checks.check_ids("token_ids", token_ids)
    if token_ids.ndim < 1:
        raise ValueError(f"token_ids must have rank >= 1 ([..., T]), got shape {token_ids.shape}")
    checks.check_positive("num_experts", num_experts, integer=True)
    k = checks.check_k(k, num_experts)
    checks.check_positive("capacity", capacity, allow_none=True, integer=True)
    if table is None:
        first = hash_expert(token_ids, num_experts, seed=seed)
    else:
        table = checks.check_ids("table", table)
        if table.ndim != 1:
            raise ValueError(f"table must have shape (V,), got {table.shape}")
        first = jnp.clip(table[jnp.clip(token_ids, 0, table.shape[0] - 1)], 0, num_experts - 1)
    expert_index = (first[..., None] + jnp.arange(k)) % num_experts  # [..., T, K]
    weight = jnp.full(expert_index.shape, 1.0 / k, jnp.float32)
    probs = jnp.mean(jnp.eye(num_experts, dtype=jnp.float32)[expert_index], axis=-2)
    route = lambda i, w, p: routing_from_choices(i, w, p, capacity=capacity)
    return map_groups(route, token_ids.ndim - 1, expert_index, weight, probs)
