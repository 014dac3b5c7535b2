"""Polytropon skill allocation (Ponti et al. 2022, "Combining Modular Skills in
Multitask Learning") and Multi-Head Routing (Caccia et al. 2023, "Multi-Head Adapter
Routing for Cross-Task Generalization").

Each task n has a learned allocation over E skills (modules), per head h when the
module's parameters are split into H blocks: logits ``[N, H, E]``. Training samples a
relaxed Bernoulli (binary concrete, Maddison et al. 2017) per entry; eval uses the
deterministic ``sigmoid(logits)``. Weights are normalized over skills, and the layer
averages its skills' parameters (per head block) with them: this routing feeds
parameter aggregation, not token dispatch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from modjax.routing import checks
from modjax.typing import Array, PRNGKey


def skill_allocation(
    logits: Array,
    rng: PRNGKey | None = None,
    *,
    temperature: float = 1.0,
    eps: float = 1e-6,
) -> Array:
    """Normalized skill weights ``[..., H, E]`` from allocation logits.

    Args:
      logits: float ``[..., H, E]`` (e.g. ``[N, H, E]`` for all tasks).
      rng: key for relaxed-Bernoulli samples (training), or None for
        ``sigmoid(logits)`` (eval).
      temperature: relaxation temperature, > 0.
      eps: keeps the normalization finite when every skill is off.
    Returns:
      float32 ``[..., H, E]``, each row sums to 1 (up to eps).
    """
    logits = checks.check_scores("logits", logits)
    checks.check_positive("temperature", temperature)
    return _allocation_impl(logits, rng, temperature=temperature, eps=eps)


@functools.partial(jax.jit, static_argnames=("temperature", "eps"))
def _allocation_impl(logits: Array, rng, *, temperature: float, eps: float) -> Array:
    lg = logits.astype(jnp.float32)
    if rng is None:
        z = jax.nn.sigmoid(lg)
    else:
        u = jax.random.uniform(rng, lg.shape, jnp.float32, 1e-6, 1.0 - 1e-6)
        z = jax.nn.sigmoid((lg + jnp.log(u) - jnp.log1p(-u)) / temperature)
    return z / (z.sum(-1, keepdims=True) + eps)


def polytropon_routing(
    logits: Array,
    task_ids: Array,
    rng: PRNGKey | None = None,
    *,
    temperature: float = 1.0,
) -> Array:
    """Skill weights of each example's task: ``[N, H, E]`` logits, ``[...]`` ids.

    Concrete task ids out of ``[0, N)`` raise a ValueError; traced ones are clipped
    into range (documented: there is no out-of-range read).

    Args:
      logits: float ``[N, H, E]`` task-by-skill allocation logits.
      task_ids: int ``[...]`` task of each example (or token).
      rng: key for training samples, or None (eval).
      temperature: > 0.
    Returns:
      float32 ``[..., H, E]`` normalized weights.
    """
    logits = checks.check_scores("logits", logits, min_rank=3)
    if logits.ndim != 3:
        raise ValueError(f"logits must be [N, H, E], got shape {logits.shape}")
    task_ids = checks.check_ids("task_ids", task_ids)
    n = logits.shape[0]
    checks.check_known_in_range("task_ids", task_ids, n)
    weights = skill_allocation(logits, rng, temperature=temperature)
    return weights[jnp.clip(task_ids, 0, n - 1)]
