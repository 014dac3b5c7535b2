"""Named, nestable composition blocks for modules (Pfeiffer et al. 2023, "Modular Deep
Learning"; AdapterHub's composition blocks, Pfeiffer et al. 2020/2023):

* :class:`Stack`: sequential composition (MAD-X, Pfeiffer et al. 2020);
* :class:`Parallel`: modules side by side on one input (sum, mean or stacked outputs);
* :class:`Fuse`: AdapterFusion attention over module outputs (Pfeiffer et al. 2021);
* :class:`Average`: fixed-weight average in output or parameter space;
* :class:`BatchSplit`: row b of a mixed batch runs through module ``ids[b]`` in one
  jitted step (stacked parameters gathered per row, or a masked select);
* :class:`Split`: the first n positions go to one module, the rest to another.

Every block is a :class:`~modjax.layers.mixture.Composition`: it takes ``(x, **context)``
and passes the context (``ids``, ``weights``, ``task_ids``, ``train``, ...) on to nested
blocks and mixtures; plain modules are called as ``m(x)``.

Example:
  >>> block = Stack(BatchSplit(language_adapters), Fuse(task_adapters, 64, rngs=rngs))
  >>> y = block(h, ids=language_ids)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from flax import nnx

from modjax.aggregation import function as function_lib
from modjax.aggregation import parameter as parameter_lib
from modjax.aggregation import representation as representation_lib
from modjax.layers.mixture import (
    Composition,
    as_module_list,
    call_child,
    check_input,
    merged_module,
    per_row_apply,
    split_stacked,
)
from modjax.layers.params import FusionParam
from modjax.routing import checks
from modjax.typing import Array, DType


class Stack(Composition):
    """Sequential composition ``modules[-1](... modules[0](x))`` (MAD-X, Pfeiffer et al.
    2020: a task adapter stacked on a language adapter). Order matters.

    Example:
      >>> Stack(language_adapter, task_adapter)(h)
    """

    def __init__(self, *modules: Callable[..., Array]):
        self.modules = as_module_list(modules, "modules")

    def __call__(self, x: Array, **ctx: Any) -> Array:
        fns = [lambda h, m=m: call_child(m, h, ctx) for m in self.modules]
        return function_lib.stack_apply(fns, x)


PARALLEL_REDUCTIONS = ("sum", "mean", "stack")


class Parallel(Composition):
    """All modules read the same input; their outputs are summed (``"sum"``, parallel
    adapters of He et al. 2022 side by side), averaged (``"mean"``) or stacked
    (``"stack"``: ``[E, ...]``, AdapterHub's Parallel, one output per module)."""

    def __init__(self, *modules: Callable[..., Array], reduce: str = "sum"):
        if reduce not in PARALLEL_REDUCTIONS:
            raise ValueError(f"reduce must be one of {PARALLEL_REDUCTIONS}, got {reduce!r}")
        self.modules = as_module_list(modules, "modules")
        self.reduce = reduce

    def __call__(self, x: Array, **ctx: Any) -> Array:
        outs = jnp.stack([call_child(m, x, ctx) for m in self.modules])
        if self.reduce == "stack":
            return outs
        y = outs.astype(jnp.float32).sum(0)
        if self.reduce == "mean":
            y = y / len(self.modules)
        return y.astype(outs.dtype)


class Fuse(Composition):
    """AdapterFusion (Pfeiffer et al. 2021): per-token attention over module outputs.

    ``q = x W_Q``, ``k_e = o_e W_K``, ``v_e = o_e W_V`` with ``o_e = modules[e](x)``;
    output ``sum_e softmax_e(q . k_e / temperature) v_e`` (plus ``x`` if ``residual``).
    ``W_V`` starts at the identity, so the output starts as a mix of the module outputs.

    Args:
      modules: E modules ``[..., D] -> [..., D]`` (e.g. residual adapters).
      d_model: D.
      temperature: softmax temperature.
      residual: add the input to the fused output.
    """

    def __init__(
        self,
        modules: Sequence[Callable[..., Array]],
        d_model: int,
        *,
        temperature: float = 1.0,
        residual: bool = False,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        self.modules = as_module_list(modules, "modules")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise ValueError(f"temperature must be a positive float, got {temperature!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be a positive float, got {temperature!r}")
        init = nnx.initializers.normal(d_model**-0.5)
        shape, axes = (d_model, d_model), ("embed", None)
        self.query = FusionParam(init(rngs.params(), shape, param_dtype), logical_axes=axes)
        self.key = FusionParam(init(rngs.params(), shape, param_dtype), logical_axes=axes)
        self.value = FusionParam(jnp.eye(d_model, dtype=param_dtype), logical_axes=axes)
        self.temperature, self.residual = float(temperature), residual

    def attend(self, x: Array, **ctx: Any) -> representation_lib.FusionOutput:
        """The fused output (without residual) and the attention weights ``[..., E]``."""
        check_input(x)
        outs = jnp.stack([call_child(m, x, ctx) for m in self.modules], axis=-2)  # [..., E, D]
        q = x @ self.query[...].astype(x.dtype)
        k = outs @ self.key[...].astype(outs.dtype)
        v = outs @ self.value[...].astype(outs.dtype)
        return representation_lib.adapter_fusion(q, k, v, temperature=self.temperature)

    def __call__(self, x: Array, **ctx: Any) -> Array:
        y = self.attend(x, **ctx).output
        return x + y.astype(x.dtype) if self.residual else y


AVERAGE_SPACES = ("output", "parameter")


class Average(Composition):
    """A fixed weighted average of modules, in output or in parameter space.

    ``"output"``: ``sum_e w_e m_e(x)`` (E forward passes). ``"parameter"``: one forward
    pass of the module whose parameters are ``sum_e w_e theta_e`` (modules of identical
    structure; model soups, Wortsman et al. 2022; the merged module is rebuilt from the
    live parameters on every call, so it trains). Weights may also be given per call as
    ``weights=[E]``.

    Args:
      modules: E modules.
      weights: E floats (uniform if None), used as given.
      space: ``"output"`` or ``"parameter"``.
    """

    def __init__(
        self,
        modules: Sequence[Callable[..., Array]],
        weights: Sequence[float] | None = None,
        *,
        space: str = "output",
    ):
        if space not in AVERAGE_SPACES:
            raise ValueError(f"space must be one of {AVERAGE_SPACES}, got {space!r}")
        self.modules = as_module_list(modules, "modules")
        e = len(self.modules)
        if weights is None:
            weights = (1.0 / e,) * e
        if isinstance(weights, str) or not isinstance(weights, Sequence) or len(weights) != e:
            raise ValueError(f"weights must be {e} floats (one per module), got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.space = space
        if space == "parameter":
            split_stacked(self.modules)

    def __call__(self, x: Array, *, weights: Array | None = None, **ctx: Any) -> Array:
        check_input(x)
        e = len(self.modules)
        w = jnp.asarray(self.weights if weights is None else weights, jnp.float32)
        if w.shape != (e,):
            raise ValueError(f"weights must be [E] = ({e},), got shape {w.shape}")
        if self.space == "output":
            outs = jnp.stack([call_child(m, x, ctx) for m in self.modules])
            return representation_lib.weighted_sum(outs, w, module_axis=0)
        graphdef, treedef, index, leaves0, stacked = split_stacked(self.modules)
        merged = [parameter_lib.smear_merge(leaf, w[None])[0] for leaf in stacked]
        return merged_module(graphdef, treedef, index, leaves0, merged)(x)


BATCH_SPLIT_MODES = ("auto", "stacked", "masked")


class BatchSplit(Composition):
    """Per-example selection: row b of the batch runs through ``modules[ids[b]]``.

    A mixed batch runs in one jitted step with static shapes, in one of two ways:

    * ``"stacked"`` (modules of identical structure): the E states are stacked, row b
      gathers its module's parameters and the module runs per row under ``jax.vmap``:
      one forward pass per row, B x |theta| gathered parameters.
    * ``"masked"`` (any modules): every module runs on the whole batch and row b keeps
      module ``ids[b]``'s output: E forward passes.

    ``"auto"`` picks ``"stacked"`` when the modules' graphs and shapes agree. Call
    ``block(x, ids=ids)`` with int ``ids [B]`` in ``[0, E)`` (``task_ids`` is used when
    ``ids`` is not given). Ids known at trace time are checked against ``[0, E)``; traced
    ids out of range give NaN rows.
    """

    def __init__(self, modules: Sequence[Callable[..., Array]], *, mode: str = "auto"):
        if mode not in BATCH_SPLIT_MODES:
            raise ValueError(f"mode must be one of {BATCH_SPLIT_MODES}, got {mode!r}")
        self.modules = as_module_list(modules, "modules")
        if mode == "auto":
            try:
                split_stacked(self.modules)
                mode = "stacked"
            except (ValueError, TypeError):
                mode = "masked"
        elif mode == "stacked":
            split_stacked(self.modules)
        self.mode = mode

    def __call__(self, x: Array, *, ids: Array | None = None, **ctx: Any) -> Array:
        check_input(x)
        ids = ctx.get("task_ids") if ids is None else ids
        if ids is None:
            raise ValueError("BatchSplit needs ids=[B] (or task_ids=[B]), got None")
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.shape != x.shape[:1]:
            raise ValueError(
                f"ids must be int [B] with B = {x.shape[0]}, got {ids.dtype} {ids.shape}"
            )
        # known ids out of range fail here; traced ones would gather NaN rows
        checks.check_known_in_range("ids", ids, len(self.modules))
        if self.mode == "masked":
            outs = jnp.stack([call_child(m, x, ctx) for m in self.modules])  # [E, B, ...]
            idx = ids.reshape((1, -1) + (1,) * (outs.ndim - 2))
            return jnp.take_along_axis(outs, idx, axis=0)[0]
        *_, stacked = split_stacked(self.modules)
        per_row = [jnp.take(leaf, ids, axis=0) for leaf in stacked]
        return per_row_apply(self.modules, x, per_row)


class Split(Composition):
    """Split by position: ``x[..., :n, :]`` goes through ``first``, ``x[..., n:, :]``
    through ``rest``, and the outputs are concatenated back along the position axis
    (e.g. prompt positions to one module, text positions to another)."""

    def __init__(self, first: Callable[..., Array], rest: Callable[..., Array], *, n: int):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        for name, m in (("first", first), ("rest", rest)):
            if not callable(m):
                raise ValueError(f"{name} must be a callable module, got {type(m).__name__}")
        self.first, self.rest, self.n = first, rest, n

    def __call__(self, x: Array, **ctx: Any) -> Array:
        check_input(x)
        if x.ndim < 2 or not 0 <= self.n <= x.shape[-2]:
            raise ValueError(f"Split(n={self.n}) needs x [..., T >= n, D], got {x.shape}")
        parts = []
        if self.n > 0:
            parts.append(call_child(self.first, x[..., : self.n, :], ctx))
        if self.n < x.shape[-2]:
            parts.append(call_child(self.rest, x[..., self.n :, :], ctx))
        return jnp.concatenate(parts, axis=-2) if len(parts) > 1 else parts[0]


__all__ = [
    "AVERAGE_SPACES",
    "BATCH_SPLIT_MODES",
    "PARALLEL_REDUCTIONS",
    "Average",
    "BatchSplit",
    "Fuse",
    "FusionParam",
    "Parallel",
    "Split",
    "Stack",
]
