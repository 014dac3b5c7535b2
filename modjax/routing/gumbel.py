"""Gumbel-softmax routing (Jang et al. 2017; Maddison et al. 2017) and straight-through
hard routing (Bengio et al. 2013): discrete choices with a gradient to the router."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from modjax.routing import checks
from modjax.routing.groups import map_groups
from modjax.routing.soft import mixture_routing
from modjax.routing.top_k import routing_from_choices
from modjax.routing.types import Routing
from modjax.typing import Array, PRNGKey


@functools.partial(jax.jit, static_argnames=("k", "capacity"))
def _straight_through(soft: Array, k: int, capacity: int | None) -> Routing:
    """Top-k of ``soft`` ``[..., T, E]`` with forward weight 1/k and the gradient of soft."""

    def route(s: Array) -> Routing:
        valid = ~jnp.any(jnp.isnan(s), axis=-1)
        _, index = jax.lax.top_k(jnp.where(jnp.isnan(s), -jnp.inf, s), k)
        chosen = jnp.take_along_axis(s, index, axis=-1)
        weight = 1.0 / k + (chosen - jax.lax.stop_gradient(chosen))  # exactly 1/k forward
        return routing_from_choices(index, weight, s, capacity=capacity, valid=valid)

    return map_groups(route, soft.ndim - 2, soft)


def straight_through_routing(
    logits: Array, k: int = 1, *, capacity_factor: float | None = None, capacity: int | None = None
) -> Routing:
    """Hard top-k routing whose weights are ``1/k`` forward and ``d softmax`` backward.

    Args:
      logits: float ``[..., T, E]``.
      k: experts per token, ``1 <= k <= E``.
      capacity_factor, capacity: as in top-k routing (dropless when both None).
    Returns:
      a :class:`Routing`; ``weight = 1/k + p - stop_gradient(p)`` at the chosen experts.
    """
    logits = checks.check_scores("logits", logits)
    t, e = logits.shape[-2:]
    k = checks.check_k(k, e)
    cap = checks.resolve_capacity(t, e, k, capacity_factor, capacity)
    return _straight_through(_softmax(logits, 1.0), k, cap)


@functools.partial(jax.jit, static_argnames=("temperature",))
def _softmax(logits: Array, temperature: float, noise_key: PRNGKey | None = None) -> Array:
    lg = logits.astype(jnp.float32)
    if noise_key is not None:
        lg = lg + jax.random.gumbel(noise_key, lg.shape, jnp.float32)
    return jax.nn.softmax(lg / temperature, axis=-1)


def gumbel_softmax_routing(
    logits: Array,
    rng: PRNGKey | None,
    *,
    temperature: float = 1.0,
    hard: bool = False,
    k: int = 1,
    capacity_factor: float | None = None,
    capacity: int | None = None,
) -> Routing:
    """Gumbel-softmax routing: ``y = softmax((logits + g) / temperature)``, g ~ Gumbel.

    Soft (``hard=False``): a dense mixture with weights y (K = E). Hard: top-k of y with
    straight-through weights (``1/k`` forward, gradient of y). With ``rng=None`` (eval)
    no noise is drawn: the deterministic counterpart (softmax, or hard top-k of it).

    Args:
      logits: float ``[..., T, E]``.
      rng: PRNG key, or None for the noiseless (eval) decision.
      temperature: > 0.
      hard: straight-through discrete choice instead of a relaxed mixture.
      k: experts per token when hard.
      capacity_factor, capacity: capacity when hard (dropless when both None).
    Returns:
      a :class:`Routing`; ``probs`` holds the (noisy) y.
    """
    logits = checks.check_scores("logits", logits)
    checks.check_positive("temperature", temperature)
    t, e = logits.shape[-2:]
    y = _softmax(logits, temperature, rng)
    if not hard:
        return mixture_routing(y)
    k = checks.check_k(k, e)
    cap = checks.resolve_capacity(t, e, k, capacity_factor, capacity)
    return _straight_through(y, k, cap)
