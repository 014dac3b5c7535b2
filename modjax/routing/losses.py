"""Load-balancing losses and auxiliary-loss-free balancing for routers.

* :func:`load_balancing_loss`: Switch Transformer (Fedus et al. 2022), ``E * sum_e f_e P_e``.
* :func:`router_z_loss`: ST-MoE (Zoph et al. 2022), ``mean(logsumexp(logits)^2)``.
* :func:`importance_loss`, :func:`load_loss`: Shazeer et al. 2017, squared coefficients
  of variation of the per-expert gate sums and of the smooth load estimate.
* :func:`sequence_balance_loss`: DeepSeek-V3 (2024) complementary sequence-wise loss.
* :func:`aux_free_bias_update`: auxiliary-loss-free balancing (Wang et al. 2024, "Auxiliary-
  Loss-Free Load Balancing Strategy for Mixture-of-Experts"): a selection-only bias
  nudged by the sign of each expert's load error, outside the optimizer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from modjax.routing import checks
from modjax.routing.types import DenseRouting, Routing
from modjax.typing import Array


def _check_routing(routing) -> None:
    if not isinstance(routing, Routing | DenseRouting):
        raise TypeError(f"routing must be a Routing or DenseRouting, got {type(routing).__name__}")


@functools.partial(jax.jit, static_argnames=("kept_only",))
def assignment_counts(routing: Routing | DenseRouting, *, kept_only: bool = False) -> Array:
    """float32 ``[..., E]``: assignments per expert in each group.

    Routing: the K choices of every valid token (before capacity drops unless
    ``kept_only``); DenseRouting: the dispatch mass of each expert.
    """
    _check_routing(routing)
    if isinstance(routing, DenseRouting):
        return routing.dispatch.sum(axis=(-3, -1))
    mask = routing.kept if kept_only else routing.kept | (routing.slot > 0)
    # a choice counts unless its token was invalid (invalid tokens have kept False, slot 0;
    # a valid dropped choice has slot >= capacity >= 1)
    one_hot = jax.nn.one_hot(routing.expert_index, routing.num_experts, dtype=jnp.float32)
    return jnp.einsum("...tk,...tke->...e", mask.astype(jnp.float32), one_hot)


def _valid_tokens(probs: Array) -> Array:
    return ~jnp.any(jnp.isnan(probs), axis=-1)


def load_balancing_loss(routing: Routing | DenseRouting) -> Array:
    """Switch Transformer auxiliary loss ``E * sum_e f_e * P_e`` over all tokens.

    ``f_e``: fraction of the T*K assignments that chose expert e (before capacity drops);
    ``P_e``: mean router probability of e. Equals 1 when both are uniform, and pushes
    probability away from overloaded experts (only P carries a gradient). Statistics
    are over all leading axes together (the global batch).

    Args:
      routing: a Routing or DenseRouting with ``probs [..., T, E]``.
    Returns:
      float32 scalar.
    """
    _check_routing(routing)
    return _switch_impl(routing)


@jax.jit
def _switch_impl(routing: Routing | DenseRouting) -> Array:
    counts = assignment_counts(routing).reshape(-1, routing.num_experts).sum(0)
    f = counts / jnp.maximum(counts.sum(), 1.0)
    probs = routing.probs.reshape(-1, routing.num_experts)
    p = probs.mean(0)
    return routing.num_experts * jnp.sum(jax.lax.stop_gradient(f) * p)


def sequence_balance_loss(routing: Routing) -> Array:
    """DeepSeek-V3 sequence-wise balance loss: the Switch loss per sequence, averaged.

    For each sequence (the T axis of each leading index), ``sum_e f_e P_e`` with
    ``f_e = E / (K T) * count_e`` and ``P_e`` the mean of the probabilities normalized to
    sum 1 per token. Keeps single sequences from collapsing onto few experts.

    Args:
      routing: a Routing with ``[B, T, K]`` fields (any number of leading axes).
    Returns:
      float32 scalar (1 at perfect balance within every sequence).
    """
    _check_routing(routing)
    e = routing.num_experts
    counts = assignment_counts(routing)  # [..., E]
    f = e * counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)
    s = routing.probs / routing.probs.sum(-1, keepdims=True)
    p = s.mean(-2)
    return jnp.mean(jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1))


def router_z_loss(logits: Array) -> Array:
    """ST-MoE router z-loss ``mean_t logsumexp(logits_t)^2``: keeps logits small.

    Args:
      logits: float ``[..., T, E]``.
    Returns:
      float32 scalar.
    """
    logits = checks.check_scores("logits", logits)
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(z**2)


def _cv_squared(x: Array, eps: float = 1e-10) -> Array:
    return jnp.var(x, axis=-1) / (jnp.mean(x, axis=-1) ** 2 + eps)


def importance_loss(gates: Array | Routing | DenseRouting) -> Array:
    """Shazeer et al. importance loss: ``CV(sum_t gates[t, :])^2`` per group, averaged.

    Args:
      gates: float ``[..., T, E]`` gate values, or a routing (its dense weights).
    Returns:
      float32 scalar.
    """
    if isinstance(gates, Routing | DenseRouting):
        gates = gates.dense_weights()
    gates = checks.check_scores("gates", gates)
    return jnp.mean(_cv_squared(gates.astype(jnp.float32).sum(-2)))


def load_loss(clean_logits: Array, noisy_logits: Array, noise_std: Array | float, k: int) -> Array:
    """Shazeer et al. smooth load loss for noisy top-k gating: ``CV(load)^2``.

    ``load_e = sum_t Phi((clean[t, e] - threshold[t, e]) / noise_std)`` where the
    threshold is the k-th largest noisy logit of the other experts: the probability that
    e stays in the top k under fresh noise.

    Args:
      clean_logits: float ``[..., T, E]`` logits before noise.
      noisy_logits: float ``[..., T, E]`` logits used for the top-k choice.
      noise_std: float, scalar or ``[..., T, E]``, > 0.
      k: experts per token, ``1 <= k < E``.
    Returns:
      float32 scalar.
    """
    clean_logits = checks.check_scores("clean_logits", clean_logits)
    noisy_logits = checks.check_scores("noisy_logits", noisy_logits)
    if clean_logits.shape != noisy_logits.shape:
        raise ValueError(
            f"noisy_logits must have the shape of clean_logits {clean_logits.shape}, "
            f"got {noisy_logits.shape}"
        )
    e = clean_logits.shape[-1]
    if e < 2:
        raise ValueError(f"clean_logits must have E >= 2 experts, got shape {clean_logits.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < e:
        raise ValueError(f"k must be an int in [1, E-1={e - 1}], got {k!r}")
    top, _ = jax.lax.top_k(noisy_logits.astype(jnp.float32), k + 1)
    in_top = noisy_logits >= top[..., k - 1 : k]
    threshold = jnp.where(in_top, top[..., k : k + 1], top[..., k - 1 : k])
    prob = jax.scipy.stats.norm.cdf((clean_logits - threshold) / noise_std)
    return jnp.mean(_cv_squared(prob.sum(-2)))


def aux_free_bias_update(bias: Array, routing: Routing | DenseRouting, rate: float) -> Array:
    """One step of auxiliary-loss-free balancing: ``bias + rate * sign(mean load - load)``.

    Loads are the assignments per expert (before capacity drops) summed over all groups;
    underloaded experts gain bias, overloaded ones lose it. The bias enters selection
    only (``top_k_routing(..., bias=...)``), so it is updated outside the optimizer.

    Args:
      bias: float32 ``[E]``.
      routing: the decision made with this bias.
      rate: update speed u, > 0 (Wang et al. use 1e-3).
    Returns:
      float32 ``[E]`` the new bias.
    """
    _check_routing(routing)
    checks.check_positive("rate", rate)
    if bias.shape != (routing.num_experts,):
        raise ValueError(f"bias must have shape ({routing.num_experts},), got {bias.shape}")
    load = assignment_counts(routing).reshape(-1, routing.num_experts).sum(0)
    error = load.mean() - load
    return (bias + rate * jnp.sign(error)).astype(bias.dtype)
