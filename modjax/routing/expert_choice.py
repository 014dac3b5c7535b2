"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice
Routing"): each expert picks its C best tokens, so load is balanced by construction.

Not causal: every expert ranks all tokens of its group, so a token's routing depends on
later tokens of the same group. Use it for encoders, or with groups that never mix past
and future (e.g. per position across a batch), not for autoregressive decoding.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from modjax.routing import checks
from modjax.routing.groups import map_groups
from modjax.routing.types import DenseRouting
from modjax.typing import Array


def expert_choice_routing(
    logits: Array, *, capacity_factor: float = 1.0, capacity: int | None = None
) -> DenseRouting:
    """Each expert takes the C tokens with its highest probability.

    ``probs = softmax(logits)`` over experts (float32); expert e takes the top
    ``C = ceil(capacity_factor * T / E)`` tokens of ``probs[:, e]`` (ties: lower token
    index), weighted by that probability. A token may be taken by several experts or by
    none. Tokens with a NaN logit are never taken (their column entries are -inf for the
    ranking; if fewer than C valid tokens remain, the slot stays empty: dispatch 0).

    Args:
      logits: float ``[..., T, E]`` router scores (leading axes are groups).
      capacity_factor: average experts per token, > 0 (ignored if ``capacity`` given).
      capacity: C tokens per expert, ``1 <= C <= T``, or None.
    Returns:
      a :class:`DenseRouting` with dispatch/combine ``[..., T, E, C]``.
    """
    logits = checks.check_scores("logits", logits)
    t, e = logits.shape[-2:]
    if capacity is None:
        checks.check_positive("capacity_factor", capacity_factor)
        capacity = max(1, math.ceil(capacity_factor * t / e))
    else:
        checks.check_positive("capacity", capacity, integer=True)
    if capacity > t:
        raise ValueError(f"capacity must be <= T={t} for expert choice, got {capacity!r}")
    return _expert_choice_impl(logits, c=int(capacity))


@functools.partial(jax.jit, static_argnames=("c",))
def _expert_choice_impl(logits: Array, *, c: int) -> DenseRouting:
    t = logits.shape[-2]

    def route(lg: Array) -> DenseRouting:
        probs = jax.nn.softmax(lg.astype(jnp.float32), axis=-1)
        valid = ~jnp.any(jnp.isnan(probs), axis=-1)
        ranking = jnp.where(valid[:, None], probs, -jnp.inf).T  # [E, T]
        gate, token = jax.lax.top_k(ranking, c)  # [E, C]
        taken = jnp.isfinite(gate)
        one_hot = jax.nn.one_hot(token, t, dtype=jnp.float32) * taken[..., None]  # [E, C, T]
        dispatch = jnp.transpose(one_hot, (2, 0, 1))
        combine = dispatch * jnp.where(valid[:, None], probs, 0.0)[:, :, None]
        return DenseRouting(dispatch=dispatch, combine=combine, probs=probs)

    return map_groups(route, logits.ndim - 2, logits)
