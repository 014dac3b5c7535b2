"""Balanced assignment (BASE layers, Lewis et al. 2021) through Sinkhorn iterations.

BASE solves a linear assignment so that every expert gets T/E tokens. Here the
assignment is relaxed to entropic optimal transport (Sinkhorn 1967; as in S-BASE, Clark
et al. 2022): a plan with row sums 1 (each token routed) and column sums T/E (each
expert equally loaded), whose per-token top-k is the selection. The plan is computed
without gradient; combine weights are the router's softmax probabilities.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from modjax.routing import checks
from modjax.routing.groups import map_groups
from modjax.routing.top_k import select_top_k
from modjax.routing.types import Routing
from modjax.typing import Array


@functools.partial(jax.jit, static_argnames=("num_iters", "temperature"))
def sinkhorn_plan(logits: Array, *, num_iters: int = 20, temperature: float = 1.0) -> Array:
    """Log of the balanced transport plan ``[T, E]``: rows sum to 1, columns to T/E.

    Args:
      logits: float32 ``[T, E]`` affinities.
      num_iters: Sinkhorn iterations (static).
      temperature: entropic regularisation; smaller is closer to a hard assignment.
    Returns:
      float32 ``[T, E]`` log plan.
    """
    t, e = logits.shape
    log_col = jnp.log(t / e)
    log_p = logits.astype(jnp.float32) / temperature

    def step(lp, _):
        lp = lp - jax.nn.logsumexp(lp, axis=0, keepdims=True) + log_col
        lp = lp - jax.nn.logsumexp(lp, axis=1, keepdims=True)
        return lp, None

    log_p, _ = jax.lax.scan(step, log_p, None, length=num_iters)
    return log_p


def balanced_routing(
    logits: Array,
    k: int = 1,
    *,
    num_iters: int = 20,
    temperature: float = 1.0,
    capacity_factor: float | None = None,
    capacity: int | None = None,
) -> Routing:
    """Balanced top-k routing: select by the Sinkhorn plan, weight by softmax probs.

    Args:
      logits: float ``[..., T, E]`` router scores (leading axes are groups).
      k: experts per token, ``1 <= k <= E``.
      num_iters: Sinkhorn iterations, >= 1.
      temperature: > 0.
      capacity_factor, capacity: as in :func:`~modjax.routing.top_k.top_k_routing`
        (dropless when both are None: balance then comes from the plan only).
    Returns:
      a :class:`Routing` (queue priority: top-1 probability). Tokens with
      a NaN logit are dropped.
    """
    logits = checks.check_scores("logits", logits)
    t, e = logits.shape[-2:]
    k = checks.check_k(k, e)
    checks.check_positive("num_iters", num_iters, integer=True)
    checks.check_positive("temperature", temperature)
    cap = checks.resolve_capacity(t, e, k, capacity_factor, capacity)
    return _balanced_impl(logits, k=k, num_iters=num_iters, temperature=temperature, cap=cap)


@functools.partial(jax.jit, static_argnames=("k", "num_iters", "temperature", "cap"))
def _balanced_impl(logits: Array, *, k: int, num_iters: int, temperature: float, cap) -> Routing:
    def route(lg: Array) -> Routing:
        lg = lg.astype(jnp.float32)
        probs = jax.nn.softmax(lg, axis=-1)
        # a NaN token must not poison the column sums of the whole group: plan it as a
        # neutral row, then hand select_top_k a NaN row so that it is dropped
        valid = ~jnp.any(jnp.isnan(lg), axis=-1, keepdims=True)
        plan = sinkhorn_plan(
            jnp.where(valid, lg, 0.0), num_iters=num_iters, temperature=temperature
        )
        plan = jnp.where(valid, jax.lax.stop_gradient(plan), jnp.nan)
        return select_top_k(plan, probs, k, capacity=cap, batch_priority=True, renormalize=True)

    return map_groups(route, logits.ndim - 2, logits)
