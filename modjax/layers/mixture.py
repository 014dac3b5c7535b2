"""Mixtures of modules: a set of modules, a router and an aggregator make one layer.

Any module with ``__call__(x)`` can take part (LoRA, adapters, (IA)^3, FFNs, nested
blocks). The pieces (Pfeiffer et al. 2023, "Modular Deep Learning"):

* :class:`Mixture`: modules + weights (from a :class:`~modjax.layers.router.Router`, a
  given ``Routing``/``DenseRouting``, given ``weights`` or ``task_ids``) + an aggregator
  from :data:`AGGREGATORS`; returns :class:`MixtureOutput` (output, aux losses,
  metrics, load). :class:`MixtureOfAdapters` is the ready-made FFN-slot layer that
  :mod:`modjax.models.blocks` builds (``ffn="mixture"``).
* Named, nestable blocks live in :mod:`modjax.layers.blocks`: ``Stack`` (sequential,
  MAD-X), ``Parallel``, ``Fuse`` (AdapterFusion), ``Average`` (output or parameter
  space), ``BatchSplit`` (row b uses module ``ids[b]``) and ``Split`` (first n positions
  to one module, the rest to another); they and :class:`Mixture` nest in one another.
* :func:`merge_modules`: post-hoc merging (TIES, DARE, task arithmetic, averaging) of
  modules of one structure into a new module.

Blocks pass their keyword context (``ids``, ``weights``, ``routing``, ``task_ids``,
``token_ids``, ``train``) on to nested blocks; plain modules are called as ``m(x)``.

Costs of the aggregators (E modules, B rows, T tokens, |theta| parameters per module):

* ``"weighted_sum"`` (output space): every module runs on every token, E forward
  passes; zero weights still cost compute, but shapes are static, so any routing of a
  mixed batch runs in one jitted step.
* ``"dispatch"``: the routing's dispatch/combine tensors ``[T, E, C]`` gather C slots
  per module (Soft MoE slot mixtures, capacity-limited top-k, expert choice); module e
  runs on its C slots only (C = T for a dropless routing, as costly as
  ``"weighted_sum"``).
* ``"smear"`` (parameter space, Muqeeth et al. 2023): the modules must have identical
  structure; their states are stacked ``[E, ...]`` (``nnx.split``), merged per example
  ``[B, ...]`` by the example's weights (token weights are averaged over the sequence)
  and the merged module runs once per row under ``jax.vmap``: B x |theta| memory, one
  forward pass per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from modjax.aggregation import parameter as parameter_lib
from modjax.aggregation import representation as representation_lib
from modjax.routing import checks
from modjax.routing.types import DenseRouting, Routing
from modjax.typing import Array, DType


class MixtureOutput(NamedTuple):
    """Result of :class:`Mixture`.

    Attributes:
      output: ``[..., T, D]`` (the modules' output shape).
      aux_losses: name -> float32 scalar, the router's (unweighted) losses.
      metrics: name -> float32 scalar or array, the router's metrics.
      expert_load: float32 ``[E]``: each module's share of the total routing weight.
    """

    output: Array
    aux_losses: dict[str, Array]
    metrics: dict[str, Array]
    expert_load: Array


# --------------------------------------------------------------------------- helpers


def as_module_list(modules, name: str) -> nnx.List:
    """A non-empty sequence of callables as an ``nnx.List`` (ValueError otherwise)."""
    if isinstance(modules, nnx.Module) or not isinstance(modules, Sequence) or not modules:
        raise ValueError(f"{name} must be a non-empty sequence of modules, got {modules!r}")
    for i, m in enumerate(modules):
        if not callable(m):
            raise ValueError(f"{name}[{i}] must be a callable module, got {type(m).__name__}")
    return nnx.List(list(modules))


def call_child(module, x: Array, ctx: dict[str, Any]) -> Array:
    """Call a child: composition blocks get the context, plain modules only ``x``."""
    if isinstance(module, Composition):
        out = module(x, **ctx)
        return out.output if isinstance(out, MixtureOutput) else out
    return module(x)


def check_input(x) -> None:
    """ValueError unless ``x`` is a float array ``[..., D]``."""
    if not hasattr(x, "ndim") or not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1:
        raise ValueError(f"x must be a float array [..., D], got {getattr(x, 'shape', x)!r}")


class StackedModules(NamedTuple):
    """E modules of one structure, split for parameter-space aggregation.

    Attributes:
      graphdef: the shared ``nnx.GraphDef``.
      treedef: the pytree structure of one module's state.
      float_index: positions of the float leaves among the state's leaves.
      leaves0: all state leaves of ``modules[0]`` (non-float ones are shared from it).
      stacked: the float leaves, each stacked over modules ``[E, ...]``.
    """

    graphdef: Any
    treedef: Any
    float_index: list[int]
    leaves0: list[Any]
    stacked: list[Array]


def split_stacked(modules: Sequence[nnx.Module]) -> StackedModules:
    """Split E modules of identical structure (``nnx.split``) and stack their float state
    leaves ``[E, ...]``.

    Raises a ValueError naming the first module that is not an ``nnx.Module`` or whose
    graph, static attributes or leaf shapes differ from ``modules[0]``'s.
    """
    for i, m in enumerate(modules):
        if not isinstance(m, nnx.Module):
            raise ValueError(
                f"parameter-space aggregation needs nnx.Module modules; modules[{i}] is a "
                f"{type(m).__name__}"
            )
    splits = [nnx.split(m) for m in modules]
    graphdef, state0 = splits[0]
    for i, (g, _) in enumerate(splits[1:], start=1):
        if g != graphdef:
            raise ValueError(
                f"parameter-space aggregation needs modules of identical structure; "
                f"modules[{i}] ({type(modules[i]).__name__}) differs from modules[0] "
                f"({type(modules[0]).__name__}) in its graph or static attributes"
            )
    states = [s for _, s in splits]
    parameter_lib.check_same_structure(states, "modules")
    leaves0, treedef = jax.tree_util.tree_flatten(state0)
    all_leaves = [jax.tree_util.tree_leaves(s) for s in states]
    float_index = [
        i for i, x in enumerate(leaves0) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    stacked = [jnp.stack([ls[i] for ls in all_leaves]) for i in float_index]
    return StackedModules(graphdef, treedef, float_index, leaves0, stacked)


def merged_module(graphdef, treedef, float_index, leaves0, float_leaves) -> nnx.Module:
    """A new module (``nnx.merge``) from a :class:`StackedModules`' parts with the float
    leaves replaced by ``float_leaves`` (one module's worth, no E axis)."""
    leaves = list(leaves0)
    for i, leaf in zip(float_index, float_leaves):
        leaves[i] = leaf
    return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))


def per_row_apply(modules, x: Array, per_row_leaves: list[Array]) -> Array:
    """Run the module built from row b's float leaves on ``x[b]`` for every row b."""
    graphdef, treedef, float_index, leaves0, _ = split_stacked(modules)

    def one(leaves, xb):
        module = merged_module(graphdef, treedef, float_index, leaves0, leaves)
        return module(xb[None])[0]

    return jax.vmap(one)(per_row_leaves, x)


def _rows_weights(weights: Array, x: Array) -> Array:
    """Per-example ``[B, E]`` weights from ``[B, E]`` or ``[B, ..., E]`` (mean over the
    middle axes: a sequence's tokens share one merged module)."""
    if weights.ndim < 2 or weights.shape[0] != x.shape[0]:
        raise ValueError(
            f"parameter-space weights must be [B, E] or [B, ..., E] with B = {x.shape[0]}, "
            f"got shape {weights.shape}"
        )
    return weights.reshape(weights.shape[0], -1, weights.shape[-1]).mean(1)


def _expand_weights(weights: Array, lead: tuple[int, ...]) -> Array:
    """``[B, E]`` (per example) or ``[..., E]`` -> broadcastable to ``[*lead, E]``."""
    missing = len(lead) - (weights.ndim - 1)
    if missing > 0:
        weights = weights.reshape(weights.shape[:-1] + (1,) * missing + weights.shape[-1:])
    try:
        jnp.broadcast_shapes(weights.shape[:-1], lead)
    except ValueError:
        raise ValueError(
            f"weights {weights.shape} do not match the input's leading dims {lead}"
        ) from None
    return weights


def merge_modules(
    modules: Sequence[nnx.Module], merge: Callable[[list[list[Array]]], list[Array]]
) -> nnx.Module:
    """A new module of the modules' (identical) structure whose float state is
    ``merge(states)``: post-hoc merging with any :mod:`modjax.aggregation.parameter`
    function. Each state is given as the list of the module's float leaves (one fixed
    order); non-float state (ints, keys) is taken from ``modules[0]``.

    Example:
      >>> merged = merge_modules(loras, lambda ps: ties_merge(ps, density=0.2))
      >>> soup = merge_modules(models, weighted_average)
    """
    modules = list(as_module_list(modules, "modules"))
    graphdef, treedef, index, leaves0, stacked = split_stacked(modules)
    states = [[leaf[e] for leaf in stacked] for e in range(len(modules))]
    merged = merge(states)
    parameter_lib.check_same_structure([states[0], merged], "[state, merge(states)]")
    return merged_module(graphdef, treedef, index, leaves0, list(merged))


# ----------------------------------------------------------------------- aggregators


def _weighted_sum(mixture, x, weights, routing, ctx):
    outs = jnp.stack([call_child(m, x, ctx) for m in mixture.modules], axis=-2)
    w = _expand_weights(weights, outs.shape[:-2])
    return representation_lib.weighted_sum(outs, w)


def _dispatch(mixture, x, weights, routing, ctx):
    if routing is None:
        raise ValueError("aggregator 'dispatch' needs a routing (router or routing=), got None")
    dense = routing.to_dense() if isinstance(routing, Routing) else routing
    if dense.dispatch.shape[:-2] != x.shape[:-1]:
        raise ValueError(
            f"routing dispatch [..., T, E, C] = {dense.dispatch.shape} does not match "
            f"x [..., T, D] = {x.shape}"
        )
    xf = x.astype(jnp.float32)
    slots = jnp.einsum("...tec,...td->...ecd", dense.dispatch, xf).astype(x.dtype)
    outs = jnp.stack(
        [call_child(m, slots[..., e, :, :], ctx) for e, m in enumerate(mixture.modules)], axis=-3
    )
    y = jnp.einsum("...tec,...ecd->...td", dense.combine, outs.astype(jnp.float32))
    return y.astype(outs.dtype)


def _smear(mixture, x, weights, routing, ctx):
    *_, stacked = split_stacked(mixture.modules)
    w = _rows_weights(weights, x)
    per_row = [parameter_lib.smear_merge(leaf, w) for leaf in stacked]
    return per_row_apply(mixture.modules, x, per_row)


#: aggregator name -> fn(mixture, x, weights [..., E], routing or None, ctx) -> output.
AGGREGATORS: dict[str, Callable[..., Array]] = {
    "weighted_sum": _weighted_sum,
    "dispatch": _dispatch,
    "smear": _smear,
}


def _check_aggregator(name) -> None:
    if name not in AGGREGATORS:
        raise ValueError(f"aggregator must be one of {sorted(AGGREGATORS)}, got {name!r}")


# ------------------------------------------------------------------------ the layer


class Composition(nnx.Module):
    """Base class of the composition blocks: they take ``(x, **context)`` and pass the
    context on to nested blocks."""


class Mixture(Composition):
    """A mixture of modules: ``y = aggregate(modules, weights(x))``.

    Args:
      modules: E modules, each ``x [..., T, D] -> [..., T, D']`` (the same D').
      router: optional module ``x -> RouterOutput`` (:class:`~modjax.layers.router.Router`)
        called as ``router(x, train=, task_ids=, token_ids=)``.
      aggregator: a key of :data:`AGGREGATORS` (see the module docstring for costs).

    Call ``mixture(x, *, routing=None, weights=None, task_ids=None, token_ids=None,
    train=False)``. The weights come from exactly one of: ``routing`` (a ``Routing`` or
    ``DenseRouting``, via ``.dense_weights()`` ``[..., T, E]``), ``weights`` (``[..., E]``,
    e.g. ``[B, E]`` per example), the router (when there is one; it also receives
    ``task_ids``), or ``task_ids`` alone (``[B]`` or ``[B, T]`` ints in ``[0, E)``: one-hot
    task routing; known ids out of range raise, traced ones get zero weights).

    Example:
      >>> loras = [LoRALinear(16, 16, rank=4, rngs=nnx.Rngs(i)) for i in range(4)]
      >>> mix = Mixture(loras, Router(16, 4, k=2, rngs=nnx.Rngs(9)))
      >>> mix(jnp.ones((2, 8, 16))).output.shape
      (2, 8, 16)
    """

    def __init__(
        self,
        modules: Sequence[Callable[..., Array]],
        router: nnx.Module | None = None,
        *,
        aggregator: str = "weighted_sum",
    ):
        self.modules = as_module_list(modules, "modules")
        _check_aggregator(aggregator)
        self.router = router
        self.aggregator = aggregator
        self.num_modules = len(self.modules)
        if router is not None:
            e = getattr(router, "num_experts", self.num_modules)
            if e != self.num_modules:
                raise ValueError(
                    f"router routes over num_experts={e}, but {self.num_modules} modules "
                    "are given (one per expert is needed)"
                )
        if aggregator == "smear":
            split_stacked(self.modules)  # identical structure, checked at construction

    def _weights(self, x, routing, weights, task_ids, token_ids, train):
        e = self.num_modules
        given = [n for n, v in (("routing", routing), ("weights", weights)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of routing / weights, got {given}")
        aux, metrics = {}, {}
        if routing is None and weights is None and self.router is not None:
            out = self.router(x, train=train, task_ids=task_ids, token_ids=token_ids)
            routing, aux, metrics = out.routing, dict(out.aux_losses), dict(out.metrics)
        if routing is not None:
            if not isinstance(routing, Routing | DenseRouting):
                raise ValueError(
                    f"routing must be a Routing or DenseRouting, got {type(routing).__name__}"
                )
            weights = routing.dense_weights()
        elif weights is None:
            if task_ids is None:
                raise ValueError(
                    "Mixture needs routing weights: pass routing=, weights= or task_ids=, "
                    "or build it with a router"
                )
            ids = jnp.asarray(task_ids)
            if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim not in (1, 2):
                raise ValueError(f"task_ids must be int [B] or [B, T], got {ids.dtype} {ids.shape}")
            # known ids out of range fail here; traced ones get all-zero weights
            checks.check_known_in_range("task_ids", ids, e)
            weights = jax.nn.one_hot(ids, e, dtype=jnp.float32)
        weights = jnp.asarray(weights)
        if weights.ndim < 1 or weights.shape[-1] != e:
            raise ValueError(
                f"weights must be [..., E] with one weight per module (E = {e}), "
                f"got shape {weights.shape}"
            )
        return weights, routing, aux, metrics

    def __call__(
        self,
        x: Array,
        *,
        routing: Routing | DenseRouting | None = None,
        weights: Array | None = None,
        task_ids: Array | None = None,
        token_ids: Array | None = None,
        train: bool = False,
        **ctx: Any,
    ) -> MixtureOutput:
        check_input(x)
        weights, routing, aux, metrics = self._weights(
            x, routing, weights, task_ids, token_ids, train
        )
        child_ctx = dict(ctx, task_ids=task_ids, token_ids=token_ids, train=train)
        y = AGGREGATORS[self.aggregator](self, x, weights, routing, child_ctx)
        w = weights.astype(jnp.float32).reshape(-1, self.num_modules).sum(0)
        load = w / jnp.maximum(w.sum(), 1e-9)
        return MixtureOutput(y, aux, metrics, load)


class MixtureOfAdapters(Mixture):
    """A routed mixture of E bottleneck adapters for a block's FFN slot (``[..., T, D]``).

    The adapters are non-residual branches (the block adds the residual), Houlsby et al.
    2019 bottlenecks routed as in AdaMix / MoA-style mixtures of adapters; the router is
    a :class:`~modjax.layers.router.Router` (float32, any strategy).

    Args:
      d_model: D.
      num_modules: E adapters.
      bottleneck_dim: each adapter's width R.
      k, strategy, capacity_factor, jitter, temperature: the Router's.
      aggregator: a key of :data:`AGGREGATORS`.
      activation: the adapters' activation.
      init_std: std of the adapters' down projections (up projections start at zero).
      dtype: activation dtype of the output; param_dtype: of all parameters.
    """

    def __init__(
        self,
        d_model: int,
        *,
        num_modules: int = 4,
        bottleneck_dim: int = 16,
        k: int = 1,
        strategy: str = "top_k",
        capacity_factor: float | None = None,
        jitter: float = 0.0,
        temperature: float = 1.0,
        aggregator: str = "weighted_sum",
        activation: str = "relu",
        init_std: float = 1e-2,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        from modjax.layers.adapter import Adapter
        from modjax.layers.router import Router

        if isinstance(num_modules, bool) or not isinstance(num_modules, int) or num_modules < 1:
            raise ValueError(f"num_modules must be a positive int, got {num_modules!r}")
        adapters = [
            Adapter(
                d_model,
                bottleneck_dim,
                activation=activation,
                residual=False,
                init_std=init_std,
                param_dtype=param_dtype,
                rngs=rngs,
            )  # fmt: skip
            for _ in range(num_modules)
        ]
        router = Router(
            d_model, num_modules, k=k, strategy=strategy, capacity_factor=capacity_factor,
            jitter=jitter, temperature=temperature, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )  # fmt: skip
        super().__init__(adapters, router, aggregator=aggregator)
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: Array, **kwargs: Any) -> MixtureOutput:
        out = super().__call__(x, **kwargs)
        return out._replace(output=out.output.astype(self.dtype))


__all__ = [
    "AGGREGATORS",
    "Composition",
    "Mixture",
    "MixtureOfAdapters",
    "MixtureOutput",
    "StackedModules",
    "as_module_list",
    "call_child",
    "check_input",
    "merge_modules",
    "merged_module",
    "per_row_apply",
    "split_stacked",
]
