"""Sparse mixture-of-experts FFN layer: a float32 router, routed FFN experts behind a
selectable dispatch strategy, and optional always-active shared experts.

``MoE(x [..., T, D]) -> MoEOutput(output [..., T, D], aux_losses, metrics, expert_load)``.
Models weigh and sum ``aux_losses`` (the router's, unweighted) into the loss.

Dispatch (``strategy=``, see :mod:`modjax.computation.ffn`): ``"dropless"`` (default;
sort + grouped matmuls, MegaBlocks), ``"capacity"`` (gather/scatter into ``[E, C, D]``
buffers, dropping over capacity), ``"einsum"`` (GShard/Switch one-hot reference). All
three are equal whenever nothing is dropped. ``impl=`` picks the grouped-matmul
implementation of ``"dropless"`` (``"auto"``: on a GPU, Pallas and, on Hopper, Mosaic GPU
kernels chosen per matmul; XLA elsewhere; see :mod:`modjax.kernels.grouped_matmul`).

Expert parallelism: when the current mesh has an ``expert`` axis of size > 1 and the
strategy is ``"dropless"``, the layer hands tokens, routing and the stacked expert
weights to :func:`modjax.parallel.expert_parallel.expert_parallel_apply` with the
``expert_fn(params, x_sorted [N, D], group_sizes [E_local]) -> [N, D]`` of
:func:`modjax.computation.ffn.make_expert_fn`; nothing else crosses that boundary.

References: Shazeer et al. 2017 (sparsely-gated MoE); Lepikhin et al. 2021 (GShard);
Fedus et al. 2022 (Switch); Gale et al. 2023 (MegaBlocks); Dai et al. 2024
(DeepSeekMoE, shared experts).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from modjax.computation import ffn as ffn_lib
from modjax.layers.ffn import FeedForward, check_float_dtype
from modjax.routing.types import DenseRouting, Routing
from modjax.typing import Array, DType

MAX_K = 8


class ExpertParam(nnx.Param):
    """Stacked per-expert weights ``[E, ...]`` (a filter for sharding and optimizers)."""


class MoEOutput(NamedTuple):
    """Result of :class:`MoE`.

    Attributes:
      output: ``[..., T, D]`` in the layer's compute dtype.
      aux_losses: name -> float32 scalar from the router (``load_balancing``,
        ``z_loss``), unweighted: the trainer weighs and sums them into the loss.
      metrics: name -> float32 array (router metrics, ``dropped_fraction``, and
        ``ep_overflow`` when the expert-parallel path ran).
      expert_load: float32 ``[E]``: fraction of kept assignments that went to each expert.
    """

    output: Array
    aux_losses: dict[str, Array]
    metrics: dict[str, Array]
    expert_load: Array


def _expert_init(base):
    """Initialise ``[E, fan_in, fan_out]`` as E independent ``[fan_in, fan_out]`` matrices."""

    def init(key, shape, dtype):
        keys = jax.random.split(key, shape[0])
        return jnp.stack([base(k, shape[1:], dtype) for k in keys])

    return init


_DEFAULT_INIT = nnx.initializers.lecun_normal()


class MoE(nnx.Module):
    """Top-k mixture of FFN experts with optional shared experts (see module docstring).

    Args:
      d_model: D.
      num_experts: E routed experts.
      d_ff: F, hidden width of each routed expert.
      k: experts per token, 1..8 and at most E.
      activation: ``"swiglu"`` or ``"gelu"`` (experts and shared experts).
      num_shared_experts: always-active experts (DeepSeekMoE); run as one FFN of width
        ``num_shared_experts * shared_d_ff``.
      shared_d_ff: hidden width of each shared expert (default ``d_ff``).
      strategy: ``"dropless"``, ``"capacity"`` or ``"einsum"``.
      impl: grouped-matmul implementation for ``"dropless"``.
      block_size: rows per block of the dropless layout (default 128).
      router_strategy, capacity_factor, batch_priority, jitter, aux_loss_free: passed to
        :class:`modjax.layers.router.Router` (the dropless path computes every kept
        assignment). Routers that return dense dispatch/combine tensors (``"soft"``,
        ``"soft_moe"``, ``"expert_choice"``) always run the einsum formulation.
      router_options: more keyword arguments of the Router (``granularity``, ...).
      ep_capacity_factor: on an expert-parallel mesh, the all-to-all receive buffer per
        device pair as a multiple of the average load (None: the dropless worst case,
        which grows with the number of expert devices); see
        :func:`modjax.parallel.expert_parallel.expert_parallel_apply`.
      ep_overflow: what assignments beyond that buffer do: ``"count"`` (they contribute
        zero and are counted in ``metrics["ep_overflow"]``) or ``"error"``.
      dtype: compute dtype of the experts; param_dtype: storage dtype of all weights.
      kernel_init: initializer of one ``[fan_in, fan_out]`` matrix.
      rngs: ``nnx.Rngs``.

    Example:
      >>> moe = MoE(64, num_experts=8, d_ff=128, k=2, rngs=nnx.Rngs(0))
      >>> out = moe(jnp.ones((2, 16, 64)))
      >>> out.output.shape, sorted(out.aux_losses)  # doctest: +SKIP
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_experts: int,
        d_ff: int,
        k: int = 1,
        activation: str = "swiglu",
        num_shared_experts: int = 0,
        shared_d_ff: int | None = None,
        strategy: str = "dropless",
        impl: str = "auto",
        block_size: int | None = None,
        router_strategy: str = "top_k",
        capacity_factor: float | None = None,
        batch_priority: bool = False,
        jitter: float = 0.0,
        aux_loss_free: bool = False,
        router_options: dict[str, Any] | None = None,
        ep_capacity_factor: float | None = None,
        ep_overflow: str = "count",
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        kernel_init=_DEFAULT_INIT,
        rngs: nnx.Rngs,
    ):
        from modjax.kernels.grouped_matmul import IMPLS
        from modjax.layers.router import Router

        for name, v in (("d_model", d_model), ("num_experts", num_experts), ("d_ff", d_ff)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(k, int) or not 1 <= k <= min(MAX_K, num_experts):
            raise ValueError(
                f"k must be an int in [1, min({MAX_K}, num_experts={num_experts})], got {k!r}"
            )
        if activation not in ffn_lib.ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ffn_lib.ACTIVATIONS)}, got {activation!r}"
            )
        if strategy not in ffn_lib.STRATEGIES:
            raise ValueError(f"strategy must be one of {ffn_lib.STRATEGIES}, got {strategy!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be an int >= 0, got {num_shared_experts!r}")
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
        self.d_model, self.num_experts, self.d_ff, self.k = d_model, num_experts, d_ff, k
        self.activation, self.strategy, self.impl = activation, strategy, impl
        if ep_capacity_factor is not None and not ep_capacity_factor > 0:
            raise ValueError(f"ep_capacity_factor must be > 0 or None, got {ep_capacity_factor!r}")
        if ep_overflow not in ("count", "error"):
            raise ValueError(f"ep_overflow must be 'count' or 'error', got {ep_overflow!r}")
        self.block_size = block_size
        self.ep_capacity_factor, self.ep_overflow = ep_capacity_factor, ep_overflow
        self.dtype = check_float_dtype("dtype", dtype)
        self.param_dtype = check_float_dtype("param_dtype", param_dtype)

        self.router = Router(
            d_model,
            num_experts,
            k=k,
            strategy=router_strategy,
            capacity_factor=capacity_factor,
            batch_priority=batch_priority,
            jitter=jitter,
            aux_loss_free=aux_loss_free,
            **(router_options or {}),
            rngs=rngs,
        )
        init = _expert_init(kernel_init)
        e, d, f = num_experts, d_model, d_ff
        for n in ffn_lib.ACTIVATIONS[activation]:
            w = init(rngs.params(), (e, d, f), self.param_dtype)
            setattr(self, n, ExpertParam(w, logical_axes=("expert", "embed", "expert_mlp")))
        w = init(rngs.params(), (e, f, d), self.param_dtype)
        self.wo = ExpertParam(w, logical_axes=("expert", "expert_mlp", "embed"))
        self.shared = nnx.data(None)
        if num_shared_experts:
            width = num_shared_experts * (shared_d_ff or d_ff)
            self.shared = FeedForward(
                d_model,
                width,
                activation=activation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=kernel_init,
                rngs=rngs,
            )

    def expert_params(self) -> dict[str, Array]:
        """The stacked expert weights as the dict :mod:`modjax.computation.ffn` takes."""
        names = (*ffn_lib.ACTIVATIONS[self.activation], "wo")
        return {n: getattr(self, n)[...] for n in names}

    def __call__(
        self,
        x: Array,
        *,
        train: bool = False,
        token_ids: Array | None = None,
        task_ids: Array | None = None,
    ) -> MoEOutput:
        """``x [..., T, D]`` -> :class:`MoEOutput` (routing per sequence ``[..., T]``).

        ``train`` enables router noise; ``token_ids``/``task_ids`` feed hash/task routers.
        """
        if x.ndim < 2 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [..., T, D={self.d_model}], got shape {x.shape}")
        routed = self.router(x, train=train, token_ids=token_ids, task_ids=task_ids)
        routing = routed.routing
        metrics = dict(routed.metrics)
        xc = x.astype(self.dtype)
        if isinstance(routing, DenseRouting):
            y = self._dense_experts(xc, routing)
            sent = routing.dispatch.reshape(-1, *routing.dispatch.shape[-2:]).sum((0, 2))
            load = sent / jnp.maximum(sent.sum(), 1e-9)
        else:
            y = self._experts(xc, routing, metrics)
            kept = routing.kept.reshape(-1, self.k)
            one_hot = jax.nn.one_hot(routing.expert_index.reshape(-1, self.k), self.num_experts)
            counts = jnp.einsum("tk,tke->e", kept.astype(jnp.float32), one_hot)
            load = counts / jnp.maximum(counts.sum(), 1.0)
            metrics.setdefault("dropped_fraction", 1.0 - jnp.mean(kept.astype(jnp.float32)))
        if self.shared is not None:
            y = y + self.shared(xc)
        return MoEOutput(y.astype(self.dtype), dict(routed.aux_losses), metrics, load)

    def _dense_experts(self, x: Array, routing: DenseRouting) -> Array:
        t, d = x.shape[-2:]
        params = self.expert_params()
        e, c = routing.dispatch.shape[-2:]
        fn = lambda xs, dr: ffn_lib.moe_ffn_dense_routing(
            xs, dr, params, activation=self.activation
        )
        dense = DenseRouting(
            dispatch=routing.dispatch.reshape(-1, t, e, c),
            combine=routing.combine.reshape(-1, t, e, c),
            probs=routing.probs.reshape(-1, t, routing.probs.shape[-1]),
        )
        return jax.vmap(fn)(x.reshape(-1, t, d), dense).reshape(x.shape)

    def _experts(self, x: Array, routing: Routing, metrics: dict[str, Any]) -> Array:
        lead, t, d = x.shape[:-2], x.shape[-2], x.shape[-1]
        params = self.expert_params()
        # Routing is per sequence: [..., T, K]; dropless needs no slots, so it flattens.
        flat = Routing(
            expert_index=routing.expert_index.reshape(-1, self.k),
            weight=routing.weight.reshape(-1, self.k),
            kept=routing.kept.reshape(-1, self.k),
            slot=routing.slot.reshape(-1, self.k),
            probs=routing.probs.reshape(-1, self.num_experts),
            num_experts=routing.num_experts,
            capacity=routing.capacity,
        )
        x2 = x.reshape(-1, d)
        if self.strategy == "dropless":
            if _use_expert_parallel():
                from modjax.parallel import expert_parallel

                expert_fn = ffn_lib.make_expert_fn(
                    self.activation, block_size=self.block_size, impl=self.impl
                )
                y, stats = expert_parallel.expert_parallel_apply(
                    x2, flat, expert_fn, params,
                    capacity_factor=self.ep_capacity_factor, overflow=self.ep_overflow,
                )  # fmt: skip
                metrics["ep_overflow"] = stats.overflow.astype(jnp.float32)
                metrics["ep_max_pair_load"] = stats.max_pair_load.astype(jnp.float32)
                return y.reshape(x.shape)
            y = ffn_lib.moe_ffn(
                x2, flat, params, activation=self.activation, strategy="dropless",
                impl=self.impl, block_size=self.block_size,
            )  # fmt: skip
            return y.reshape(x.shape)
        # Capacity-based strategies keep per-sequence slots: map over leading axes.
        seqs = Routing(
            expert_index=routing.expert_index.reshape(-1, t, self.k),
            weight=routing.weight.reshape(-1, t, self.k),
            kept=routing.kept.reshape(-1, t, self.k),
            slot=routing.slot.reshape(-1, t, self.k),
            probs=routing.probs.reshape(-1, t, self.num_experts),
            num_experts=routing.num_experts,
            capacity=routing.capacity,
        )
        fn = lambda xs, r: ffn_lib.moe_ffn(
            xs, r, params, activation=self.activation, strategy=self.strategy
        )
        y = jax.vmap(fn)(x.reshape(-1, t, d), seqs)
        return y.reshape(*lead, t, d)


def _use_expert_parallel() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return False
    from modjax.parallel.expert_parallel import use_expert_parallel

    return use_expert_parallel()
