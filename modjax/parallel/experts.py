"""Expert functions for :func:`modjax.parallel.expert_parallel_apply`: grouped over the
local experts of one device.

Each is ``expert_fn(params, x [N, D], group_sizes int32 [E_local]) -> [N, D]`` with the
rows of ``x`` sorted by expert and padding rows (past ``sum(group_sizes)``) last; every
parameter leaf has a leading ``E_local`` axis. The grouped matmul is
``jax.lax.ragged_dot`` (XLA on every backend); the slow twin
:func:`grouped_matmul_reference` masks one expert at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from modjax.typing import Array, PyTree


def grouped_matmul(x: Array, w: Array, group_sizes: Array) -> Array:
    """``[N, D] x [G, D, F] -> [N, F]``: rows of group g times ``w[g]``; padding rows 0."""
    return jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32))


def grouped_matmul_reference(x: Array, w: Array, group_sizes: Array) -> Array:
    """Slow twin of :func:`grouped_matmul`: one masked dense matmul per group."""
    ends = jnp.cumsum(group_sizes)
    row = jnp.arange(x.shape[0])
    group = (row[:, None] >= ends[None, :]).sum(-1)  # == G for padding rows
    out = jnp.zeros((x.shape[0], w.shape[-1]), jnp.result_type(x, w))
    for g in range(w.shape[0]):
        out = out + jnp.where((group == g)[:, None], x @ w[g], 0)
    return out


def make_ffn_expert_fn(
    activation: Callable[[Array], Array] = jax.nn.gelu,
    matmul: Callable[[Array, Array, Array], Array] = grouped_matmul,
) -> Callable[[PyTree, Array, Array], Array]:
    """FFN experts ``w_out[e]^T act(w_in[e]^T x)``; params ``{"w_in": [E, D, F],
    "w_out": [E, F, D]}`` (optionally ``"w_gate": [E, D, F]`` for a gated FFN)."""

    def ffn_expert_fn(params: PyTree, x: Array, group_sizes: Array) -> Array:
        h = activation(matmul(x, params["w_in"], group_sizes))
        if "w_gate" in params:
            h = h * matmul(x, params["w_gate"], group_sizes)
        return matmul(h.astype(x.dtype), params["w_out"], group_sizes)

    return ffn_expert_fn


def make_lora_expert_fn(
    scale: float = 1.0,
    matmul: Callable[[Array, Array, Array], Array] = grouped_matmul,
) -> Callable[[PyTree, Array, Array], Array]:
    """LoRA experts (Hu et al. 2021) as a mixture of adapters: ``scale * B[e]^T A[e]^T x``,
    the low-rank *delta* of expert e; params ``{"a": [E, D, R], "b": [E, R, D]}``. The
    frozen base projection is applied once, outside, by the layer."""

    def lora_expert_fn(params: PyTree, x: Array, group_sizes: Array) -> Array:
        h = matmul(x, params["a"], group_sizes)
        return (scale * matmul(h, params["b"], group_sizes)).astype(x.dtype)

    return lora_expert_fn
