"""Router layers: gating weights, input jitter and balancing state around the pure
routers of :mod:`modjax.routing`.

:class:`Router` maps token representations ``[..., S, D]`` to a routing decision plus
its auxiliary losses and metrics. Its gating weights are :class:`RouterParam` (an
``nnx.Param``, logical axes ``("embed", "expert")``); the auxiliary-loss-free balancing
bias (Wang et al. 2024) is :class:`RouterBias`, an ``nnx.Variable`` that is not a
Param, so optimizers filtered on ``nnx.Param`` never touch it: the trainer calls
:meth:`Router.update_bias` after each step instead. Router math is float32 whatever the
input dtype. Noise (jitter, Gumbel) comes from the ``"router"`` rng stream (falling back
to ``"default"``) and is used only with ``train=True``.

:class:`SkillAllocator` holds Polytropon / MHR task-by-skill allocation logits.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from modjax import routing as R
from modjax.routing import checks
from modjax.routing.types import DenseRouting, Routing
from modjax.typing import Array, DType

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_DEFAULT_INIT = nnx.initializers.normal(0.02)


class RouterParam(nnx.Param):
    """Gating weights of a router, ``[D, E]`` (``[D, E * slots]`` for Soft MoE)."""


class RouterBias(nnx.Variable):
    """Selection-only balancing bias ``[E]``, updated outside the optimizer."""


class RouterOutput(NamedTuple):
    """What a router returns to its layer.

    Attributes:
      routing: a Routing or DenseRouting whose fields have x's leading dims.
      aux_losses: name -> float32 scalar (unweighted; the trainer weighs them).
      metrics: name -> float32 array, from :func:`modjax.routing.routing_metrics`.
    """

    routing: Routing | DenseRouting
    aux_losses: dict[str, Array]
    metrics: dict[str, Array]


def _top_k(self, logits, ctx):
    bias = self.bias[...] if self.bias is not None else None
    return R.top_k_routing(
        logits,
        self.k,
        capacity_factor=self.capacity_factor,
        batch_priority=self.batch_priority,
        bias=bias,
    )


def _expert_choice(self, logits, ctx):
    return R.expert_choice_routing(logits, capacity_factor=self.capacity_factor or 1.0)


def _balanced(self, logits, ctx):
    return R.balanced_routing(
        logits, self.k, temperature=self.temperature, capacity_factor=self.capacity_factor
    )


def _soft(self, logits, ctx):
    return R.soft_routing(logits, temperature=self.temperature)


def _soft_moe(self, logits, ctx):
    return R.soft_moe_routing(logits.reshape(logits.shape[:-1] + (self.num_experts, -1)))


def _gumbel(self, logits, ctx):
    return R.gumbel_softmax_routing(
        logits,
        ctx["rng"],
        temperature=self.temperature,
        hard=True,
        k=self.k,
        capacity_factor=self.capacity_factor,
    )


def _straight_through(self, logits, ctx):
    return R.straight_through_routing(logits, self.k, capacity_factor=self.capacity_factor)


def _hash(self, logits, ctx):
    if ctx["token_ids"] is None:
        raise ValueError("strategy 'hash' needs token_ids [..., S], got token_ids=None")
    s, e = ctx["num_tokens"], self.num_experts
    capacity = checks.resolve_capacity(s, e, self.k, self.capacity_factor, None)
    return R.hash_routing(ctx["token_ids"], e, k=self.k, capacity=capacity)


def _task(self, logits, ctx):
    ids = ctx["task_ids"]
    if ids is None:
        raise ValueError("strategy 'task' needs task_ids ([...] or [..., S]), got None")
    s = ctx["num_tokens"]
    per_sequence = ids.shape == ctx["lead"]
    capacity = checks.resolve_capacity(s, self.num_experts, 1, self.capacity_factor, None)
    return R.task_routing(
        ids, self.num_experts, num_tokens=s if per_sequence else None, capacity=capacity
    )


#: strategy name -> function(router, logits [..., T, E'], ctx) -> routing decision.
STRATEGIES = {
    "top_k": _top_k,
    "expert_choice": _expert_choice,
    "balanced": _balanced,
    "soft": _soft,
    "soft_moe": _soft_moe,
    "gumbel": _gumbel,
    "straight_through": _straight_through,
    "hash": _hash,
    "task": _task,
}
_NO_GATE = ("hash", "task")
_DENSE = ("expert_choice", "soft_moe")


class Router(nnx.Module):
    """A learned (or fixed) router: ``x [..., S, D] -> RouterOutput``.

    Strategies (``STRATEGIES``): ``"top_k"`` (Shazeer 2017 / Switch; capacity, batch
    priority, aux-loss-free bias), ``"expert_choice"`` (Zhou 2022; not causal),
    ``"balanced"`` (BASE via Sinkhorn), ``"soft"`` (dense mixture), ``"soft_moe"``
    (Puigcerver 2023, ``num_slots`` per expert), ``"gumbel"`` (hard Gumbel-softmax,
    noise in training), ``"straight_through"``, ``"hash"`` (Roller 2021, needs
    ``token_ids``) and ``"task"`` (needs ``task_ids``). Leading axes of x are groups:
    capacity and expert choice act within each ``[S]`` group. ``capacity_factor`` applies
    to every sparse strategy (hash and task included); the dense ``"soft"`` and
    ``"soft_moe"`` reject it, and the gateless ``"hash"`` and ``"task"`` reject jitter.

    ``temperature`` is the softmax temperature of ``"soft"`` and ``"gumbel"`` and the
    Sinkhorn regularisation of ``"balanced"`` (smaller: closer to an exact assignment).

    Granularity ``"token"`` routes each token; ``"sequence"`` routes the mean of each
    sequence once and shares the decision with its tokens (dropless). For a global
    level, call one Router at the model input and pass its routing to every layer.

    Example:
      >>> router = Router(16, 4, k=2, capacity_factor=1.25, rngs=nnx.Rngs(0))
      >>> out = router(jnp.ones((2, 8, 16)))
      >>> out.routing.expert_index.shape, sorted(out.aux_losses)
      ((2, 8, 2), ['load_balancing', 'z_loss'])
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        k: int = 1,
        strategy: str = "top_k",
        capacity_factor: float | None = None,
        batch_priority: bool = False,
        jitter: float = 0.0,
        aux_loss_free: bool = False,
        granularity: str = "token",
        num_slots: int = 1,
        temperature: float = 1.0,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        kernel_init=_DEFAULT_INIT,
        rngs: nnx.Rngs,
    ):
        for name, v in (("in_features", in_features), ("num_experts", num_experts)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
        if granularity not in ("token", "sequence"):
            raise ValueError(f"granularity must be 'token' or 'sequence', got {granularity!r}")
        if granularity == "sequence" and (strategy in _DENSE or capacity_factor is not None):
            raise ValueError(
                "granularity='sequence' needs a sparse dropless strategy (no capacity), got "
                f"strategy={strategy!r}, capacity_factor={capacity_factor!r}"
            )
        if strategy not in ("soft", "soft_moe", "expert_choice"):
            checks.check_k(k, num_experts)
        checks.check_positive("capacity_factor", capacity_factor, allow_none=True)
        checks.check_positive("num_slots", num_slots, integer=True)
        checks.check_positive("temperature", temperature)
        if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 1:
            raise ValueError(f"jitter must be a float in [0, 1), got {jitter!r}")
        # options a strategy would ignore are errors, not silent no-ops
        if strategy in ("soft", "soft_moe") and capacity_factor is not None:
            raise ValueError(
                f"strategy {strategy!r} is dense and takes no capacity_factor, "
                f"got capacity_factor={capacity_factor!r}"
            )
        if strategy in _NO_GATE and jitter:
            raise ValueError(f"strategy {strategy!r} has no gate to jitter, got jitter={jitter!r}")
        if aux_loss_free and strategy != "top_k":
            raise ValueError(f"aux_loss_free needs strategy 'top_k', got {strategy!r}")
        for name, dt in (("dtype", dtype), ("param_dtype", param_dtype)):
            if jnp.dtype(dt) not in _FLOAT_DTYPES:
                raise ValueError(f"{name} must be float32, bfloat16 or float16, got {dt!r}")
        self.in_features, self.num_experts, self.k = in_features, num_experts, k
        self.strategy, self.granularity = strategy, granularity
        self.capacity_factor, self.batch_priority = capacity_factor, batch_priority
        self.jitter, self.num_slots, self.temperature = float(jitter), num_slots, temperature
        self.dtype = jnp.dtype(dtype)  # activations; router math is float32 regardless
        width = num_experts * (num_slots if strategy == "soft_moe" else 1)
        if strategy in _NO_GATE:
            self.kernel = None
        else:
            w = kernel_init(rngs.params(), (in_features, width), jnp.dtype(param_dtype))
            self.kernel = RouterParam(w, logical_axes=("embed", "expert"))
        if aux_loss_free:
            self.bias = RouterBias(jnp.zeros((num_experts,), jnp.float32))
        else:
            self.bias = None
        self.rngs = nnx.Rngs(router=rngs.router())

    def logits(self, x: Array, *, train: bool = False) -> Array:
        """float32 ``[..., S, E]`` gate scores (``[..., S, E * slots]`` for Soft MoE)."""
        x = x.astype(jnp.float32)
        if train and self.jitter > 0:
            lo, hi = 1.0 - self.jitter, 1.0 + self.jitter
            x = x * jax.random.uniform(self.rngs.router(), x.shape, jnp.float32, lo, hi)
        return x @ self.kernel[...].astype(jnp.float32)

    def __call__(
        self,
        x: Array,
        *,
        train: bool = False,
        token_ids: Array | None = None,
        task_ids: Array | None = None,
    ) -> RouterOutput:
        """Route ``x``.

        Args:
          x: float ``[..., S, D]`` with D = ``in_features``.
          train: draw jitter / Gumbel noise from the ``"router"`` rng stream.
          token_ids: int ``[..., S]`` (strategy ``"hash"``).
          task_ids: int ``[...]`` per sequence or ``[..., S]`` per token (``"task"``).
        Returns:
          :class:`RouterOutput`; routing fields are ``[..., S, K]`` (``[..., S, E, C]``
          for dense strategies).
        """
        if not hasattr(x, "ndim") or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"x must be a float array, got {getattr(x, 'dtype', type(x))}")
        if x.ndim < 2 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [..., S, {self.in_features}], got shape {x.shape}")
        lead, s = x.shape[:-2], x.shape[-2]
        ctx = {"token_ids": token_ids, "task_ids": task_ids, "lead": lead, "num_tokens": s}
        ctx["rng"] = self.rngs.router() if train and self.strategy == "gumbel" else None
        route = STRATEGIES[self.strategy]
        aux: dict[str, Array] = {}
        if self.strategy in _NO_GATE:
            routing = route(self, None, ctx)
        else:
            xr = R.pool_tokens(x) if self.granularity == "sequence" else x
            logits = self.logits(xr, train=train)
            routing = route(self, logits, ctx)
            if self.granularity == "sequence":
                routing = R.broadcast_routing(routing, s)
            aux["z_loss"] = R.router_z_loss(logits)
            if self.strategy not in _DENSE:
                aux["load_balancing"] = R.load_balancing_loss(routing)
        return RouterOutput(routing, aux, R.routing_metrics(routing))

    def update_bias(self, routing: Routing, rate: float) -> None:
        """Aux-loss-free step: ``bias += rate * sign(mean load - load)`` (no gradient)."""
        if self.bias is None:
            raise ValueError("update_bias needs a Router built with aux_loss_free=True")
        new = R.aux_free_bias_update(self.bias[...], routing, rate)
        self.bias[...] = jax.lax.stop_gradient(new)


class SkillAllocator(nnx.Module):
    """Polytropon / MHR allocation logits ``[N, H, E]`` -> skill weights per task.

    Ponti et al. 2022; Caccia et al. 2023. ``__call__(task_ids, train=...)`` returns
    ``[..., H, E]`` normalized weights: relaxed-Bernoulli samples (``"router"`` stream)
    in training, ``sigmoid`` in eval.
    """

    def __init__(
        self,
        num_tasks: int,
        num_skills: int,
        *,
        num_heads: int = 1,
        temperature: float = 1.0,
        rngs: nnx.Rngs,
    ):
        for name, v in (
            ("num_tasks", num_tasks),
            ("num_skills", num_skills),
            ("num_heads", num_heads),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        checks.check_positive("temperature", temperature)
        w = jax.random.uniform(
            rngs.params(), (num_tasks, num_heads, num_skills), jnp.float32, -1e-3, 1e-3
        )
        self.logits = RouterParam(w, logical_axes=("task", None, "expert"))
        self.temperature = temperature
        self.rngs = nnx.Rngs(router=rngs.router())

    def __call__(self, task_ids: Array, *, train: bool = False) -> Array:
        rng = self.rngs.router() if train else None
        return R.polytropon_routing(self.logits[...], task_ids, rng, temperature=self.temperature)


__all__ = ["STRATEGIES", "Router", "RouterBias", "RouterOutput", "RouterParam", "SkillAllocator"]
