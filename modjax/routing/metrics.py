"""Router metrics: how evenly and how confidently a routing decision uses its experts."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from modjax.routing.losses import assignment_counts
from modjax.routing.types import DenseRouting, Routing
from modjax.typing import Array


def routing_metrics(routing: Routing | DenseRouting) -> dict[str, Array]:
    """Load and confidence statistics of a routing decision, over all leading axes.

    Returns a dict of float32 arrays:
      ``load_fraction [E]``: share of kept assignments (dispatch mass) per expert;
      ``max_load``: max over experts of load / mean load (1 is perfect balance);
      ``load_cv``: coefficient of variation (std / mean) of the per-expert load;
      ``dropped_fraction``: share of the T*K assignments dropped (Routing), or of tokens
      that no expert takes (DenseRouting, e.g. expert choice);
      ``num_dropped``: the count behind ``dropped_fraction``;
      ``entropy``: mean over tokens of the entropy of ``probs`` (nats);
      ``confidence``: mean over tokens of the top-1 probability.
    Tokens with a NaN probability row count as dropped and make entropy/confidence NaN.

    Args:
      routing: a Routing or DenseRouting.
    """
    if not isinstance(routing, Routing | DenseRouting):
        raise TypeError(f"routing must be a Routing or DenseRouting, got {type(routing).__name__}")
    return _metrics_impl(routing)


@jax.jit
def _metrics_impl(routing: Routing | DenseRouting) -> dict[str, Array]:
    e = routing.num_experts
    load = assignment_counts(routing, kept_only=True).reshape(-1, e).sum(0)
    total = load.sum()
    mean = total / e
    if isinstance(routing, Routing):
        dropped = jnp.sum(~routing.kept).astype(jnp.float32)
        dropped_fraction = dropped / routing.kept.size
    else:
        taken = routing.dispatch.sum(axis=(-2, -1)) > 0
        dropped = jnp.sum(~taken).astype(jnp.float32)
        dropped_fraction = dropped / taken.size
    probs = routing.probs.reshape(-1, e).astype(jnp.float32)
    entropy = -jnp.sum(
        jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), -1
    )
    entropy = jnp.where(jnp.any(jnp.isnan(probs), -1), jnp.nan, entropy)
    return {
        "load_fraction": load / jnp.maximum(total, 1e-9),
        "max_load": load.max() / jnp.maximum(mean, 1e-9),
        "load_cv": jnp.std(load) / jnp.maximum(mean, 1e-9),
        "dropped_fraction": dropped_fraction,
        "num_dropped": dropped,
        "entropy": entropy.mean(),
        "confidence": probs.max(-1).mean(),
    }
