"""The routing decision types that every layer and kernel consumes.

Two shapes of decision cover all routers:

* :class:`Routing` (sparse, token-major): each of T tokens picks K (expert, weight)
  pairs. Top-k token choice, hash, balanced (BASE), task routing, Gumbel/straight-through
  all return it. Dropless grouped-matmul kernels consume ``expert_index`` and ``weight``;
  capacity-based dispatch also uses ``slot`` and ``kept``.
* :class:`DenseRouting`: dispatch and combine tensors ``[T, E, C]``. Soft MoE slots and
  expert choice return it (each expert picks its tokens), and any sparse decision can be
  turned into one with :meth:`Routing.to_dense` for the one-hot einsum reference path.

Both are pytrees (``jax.tree_util.register_dataclass``) whose integer sizes are static
metadata, so they pass through ``jax.jit`` and ``jax.vmap`` (vmap over a leading group
axis G gives routing per group).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from modjax.typing import Array


@dataclasses.dataclass(frozen=True)
class Routing:
    """A sparse routing decision for T tokens over E experts, K choices per token.

    Attributes:
      expert_index: int32 ``[T, K]``, always in ``[0, E)`` (also where dropped or NaN).
      weight: float32 ``[T, K]`` combine weights; exactly 0 where ``kept`` is False.
      kept: bool ``[T, K]``: whether the assignment survived the capacity limit.
      slot: int32 ``[T, K]``: position of the assignment in its expert's queue, in
        priority order (``0 <= slot``); meaningful where ``kept``; ``< capacity`` there.
      probs: float32 ``[T, E]`` router probabilities, for auxiliary losses and metrics.
      num_experts: E (static).
      capacity: C, slots per expert (static), or None for a dropless decision.
    """

    expert_index: Array
    weight: Array
    kept: Array
    slot: Array
    probs: Array
    num_experts: int = dataclasses.field(metadata={"static": True})
    capacity: int | None = dataclasses.field(default=None, metadata={"static": True})

    @property
    def num_tokens(self) -> int:
        return self.expert_index.shape[-2]

    @property
    def k(self) -> int:
        return self.expert_index.shape[-1]

    def buffer_capacity(self) -> int:
        """Slots per expert of a dispatch buffer: ``capacity``, or T when dropless."""
        return self.num_tokens if self.capacity is None else self.capacity

    def dense_weights(self) -> Array:
        """float32 ``[T, E]``: the combine weight of each expert for each token."""
        one_hot = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=jnp.float32)
        return jnp.einsum("...tk,...tke->...te", self.weight, one_hot)

    def to_dense(self) -> DenseRouting:
        """The same decision as ``[T, E, C]`` dispatch/combine tensors (C = buffer size)."""
        c = self.buffer_capacity()
        expert = jax.nn.one_hot(self.expert_index, self.num_experts, dtype=jnp.float32)
        slot = jax.nn.one_hot(jnp.where(self.kept, self.slot, c), c, dtype=jnp.float32)
        dispatch = jnp.einsum("...tke,...tkc->...tec", expert, slot)
        combine = jnp.einsum("...tk,...tke,...tkc->...tec", self.weight, expert, slot)
        return DenseRouting(dispatch=dispatch, combine=combine, probs=self.probs)


@dataclasses.dataclass(frozen=True)
class DenseRouting:
    """A routing decision as dense dispatch/combine tensors.

    Attributes:
      dispatch: float32 ``[T, E, C]``: weight of token t in slot c of expert e's input.
        One-hot for hard routers; for Soft MoE each slot's column sums to 1 over T.
      combine: float32 ``[T, E, C]``: weight of slot (e, c)'s output in token t's output.
      probs: float32 ``[T, E]`` router probabilities, for losses and metrics.
    """

    dispatch: Array
    combine: Array
    probs: Array

    @property
    def num_experts(self) -> int:
        return self.dispatch.shape[-2]

    @property
    def capacity(self) -> int:
        return self.dispatch.shape[-1]

    def dense_weights(self) -> Array:
        """float32 ``[T, E]``: total combine weight of each expert for each token."""
        return self.combine.sum(-1)


for _cls in (Routing, DenseRouting):
    _fields = dataclasses.fields(_cls)
    jax.tree_util.register_dataclass(
        _cls,
        data_fields=[f.name for f in _fields if not f.metadata.get("static")],
        meta_fields=[f.name for f in _fields if f.metadata.get("static")],
    )
