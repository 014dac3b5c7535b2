"""Soft routing: every token uses every module, mixed by softmax weights (a dense
mixture, Jacobs et al. 1991), and Soft MoE slots (Puigcerver et al. 2023, "From Sparse
to Soft Mixtures of Experts")."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from modjax.routing import checks
from modjax.routing.groups import map_groups
from modjax.routing.top_k import routing_from_choices
from modjax.routing.types import DenseRouting, Routing
from modjax.typing import Array


@jax.jit
def mixture_routing(probs: Array, *, valid: Array | None = None) -> Routing:
    """A dropless Routing with K = E: token t uses expert e with weight ``probs[t, e]``.

    Args:
      probs: float32 ``[..., T, E]`` mixture weights (rows sum to 1).
      valid: bool ``[..., T]`` tokens to route (default: rows without NaN).
    Returns:
      a :class:`Routing` with ``expert_index[t] = 0..E-1``.
    """
    e = probs.shape[-1]
    if valid is None:
        valid = ~jnp.any(jnp.isnan(probs), axis=-1)
    index = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), probs.shape)
    route = lambda i, p, v: routing_from_choices(i, p, p, capacity=None, valid=v)
    return map_groups(route, probs.ndim - 2, index, probs, valid)


def soft_routing(logits: Array, *, temperature: float = 1.0) -> Routing:
    """Dense softmax mixture of all E modules: weights ``softmax(logits / temperature)``.

    Args:
      logits: float ``[..., T, E]`` router scores.
      temperature: > 0.
    Returns:
      a dropless :class:`Routing` with K = E (NaN rows dropped).
    """
    logits = checks.check_scores("logits", logits)
    checks.check_positive("temperature", temperature)
    return _soft_impl(logits, temperature=temperature)


@functools.partial(jax.jit, static_argnames=("temperature",))
def _soft_impl(logits: Array, *, temperature: float) -> Routing:
    return mixture_routing(jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1))


def soft_moe_routing(logits: Array) -> DenseRouting:
    """Soft MoE slots: each slot is a convex mix of all tokens, each token a mix of slots.

    ``logits[t, e, c] = x_t . phi_{e,c}``; dispatch is the softmax over tokens (each
    slot's input is a weighted average of the group's tokens) and combine the softmax
    over all ``E * C`` slots (each token's output a weighted average of slot outputs).
    Like expert choice it is not causal: every slot sees its whole group. For the same
    reason a NaN logit is not dropped: it makes every slot of its group NaN.

    Args:
      logits: float ``[..., T, E, C]`` token-slot scores.
    Returns:
      a :class:`DenseRouting` ``[..., T, E, C]``; ``probs [..., T, E]`` is the combine
      weight per expert.
    """
    logits = checks.check_scores("logits", logits, min_rank=3)
    return _soft_moe_impl(logits)


@jax.jit
def _soft_moe_impl(logits: Array) -> DenseRouting:
    lg = logits.astype(jnp.float32)
    dispatch = jax.nn.softmax(lg, axis=-3)
    flat = lg.reshape(lg.shape[:-2] + (-1,))
    combine = jax.nn.softmax(flat, axis=-1).reshape(lg.shape)
    return DenseRouting(dispatch=dispatch, combine=combine, probs=combine.sum(-1))
