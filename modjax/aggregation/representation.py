"""Representation aggregation: combine the outputs of several modules.

* :func:`weighted_sum`: ``sum_e w_e * h_e`` with routing weights (the combine step of a
  mixture of experts, Shazeer et al. 2017; of soft mixtures, Jacobs et al. 1991).
* :func:`adapter_fusion`: AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion:
  Non-Destructive Task Composition for Transfer Learning"): a dot-product attention whose
  query is the sublayer output and whose keys and values are the E adapter outputs, so
  each token learns its own mixture of adapters. The projections are arrays the caller
  owns (:class:`modjax.layers.blocks.Fuse` holds them as parameters).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from modjax.typing import Array, ArrayLike


def _check_array(name: str, x) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")


def weighted_sum(outputs: Array, weights: ArrayLike, *, module_axis: int = -2) -> Array:
    """Weighted sum of E module outputs.

    Args:
      outputs: ``[..., E, D]`` (``module_axis=-2``, the default) or, for outputs stacked
        in front, ``[E, ..., D]`` (``module_axis=0``); the module axis may be anywhere.
      weights: ``[..., E]`` whose leading dims are those of ``outputs`` without the module
        axis and the last axis (or broadcastable to them, e.g. ``[E]`` for fixed weights).

    Returns:
      ``[..., D]`` in ``outputs``' dtype, accumulated in float32.

    Example:
      >>> weighted_sum(jnp.ones((2, 3, 4)), jnp.array([0.5, 0.25, 0.25])).shape
      (2, 4)
    """
    _check_array("outputs", outputs)
    weights = jnp.asarray(weights)
    if outputs.ndim < 2:
        raise ValueError(f"outputs must be [..., E, D] (rank >= 2), got shape {outputs.shape}")
    axis = module_axis % outputs.ndim if -outputs.ndim <= module_axis < outputs.ndim else None
    if axis is None or axis == outputs.ndim - 1:
        raise ValueError(
            f"module_axis must index a non-last axis of outputs {outputs.shape}, "
            f"got {module_axis!r}"
        )
    moved = jnp.moveaxis(outputs, axis, -2)  # [..., E, D]
    e = moved.shape[-2]
    if weights.ndim < 1 or weights.shape[-1] != e:
        raise ValueError(
            f"weights must be [..., E] with E = {e} (one weight per module), "
            f"got shape {weights.shape}"
        )
    lead = moved.shape[:-2]
    try:
        jnp.broadcast_shapes(weights.shape[:-1], lead)
    except ValueError:
        raise ValueError(
            f"weights {weights.shape} do not broadcast to the outputs' leading dims "
            f"{lead} (+ [E={e}])"
        ) from None
    y = jnp.einsum("...ed,...e->...d", moved.astype(jnp.float32), weights.astype(jnp.float32))
    return y.astype(outputs.dtype)


class FusionOutput(NamedTuple):
    """Result of :func:`adapter_fusion`.

    Attributes:
      output: ``[..., D]`` the attention-weighted mix of the values.
      weights: float32 ``[..., E]`` attention over the E modules (sums to 1).
    """

    output: Array
    weights: Array


def adapter_fusion(
    query: Array,
    keys: Array,
    values: Array,
    *,
    temperature: float = 1.0,
    mask: Array | None = None,
) -> FusionOutput:
    """AdapterFusion attention over module outputs (Pfeiffer et al. 2021).

    ``weights = softmax_e(<query, keys_e> / temperature)``,
    ``output = sum_e weights_e * values_e``; the caller has already applied the query,
    key and value projections (``query = h W_Q``, ``keys = o W_K``, ``values = o W_V``
    with h the sublayer output and ``o [..., E, D]`` the adapters' outputs).

    Args:
      query: ``[..., Dk]``.
      keys: ``[..., E, Dk]``.
      values: ``[..., E, D]``.
      temperature: positive softmax temperature (the paper anneals it; 1 by default).
      mask: optional bool ``[..., E]`` (or broadcastable), True where a module may be
        attended; a row with no allowed module gets zero weights and a zero output.

    Returns:
      :class:`FusionOutput`; softmax in float32, output in ``values``' dtype.
    """
    for name, a in (("query", query), ("keys", keys), ("values", values)):
        _check_array(name, a)
    if keys.ndim < 2 or values.ndim < 2:
        raise ValueError(
            f"keys and values must be [..., E, Dk] and [..., E, D], got {keys.shape} and "
            f"{values.shape}"
        )
    if query.shape != keys.shape[:-2] + keys.shape[-1:]:
        raise ValueError(
            f"query must be [..., Dk] matching keys [..., E, Dk] = {keys.shape}, got {query.shape}"
        )
    if values.shape[:-1] != keys.shape[:-1]:
        raise ValueError(
            f"values must be [..., E, D] with [..., E] = {keys.shape[:-1]}, got {values.shape}"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be a positive float, got {temperature!r}")
    scores = jnp.einsum(
        "...k,...ek->...e", query.astype(jnp.float32), keys.astype(jnp.float32)
    ) / float(temperature)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        try:
            mask = jnp.broadcast_to(mask, scores.shape)
        except ValueError:
            raise ValueError(
                f"mask must broadcast to [..., E] = {scores.shape}, got {mask.shape}"
            ) from None
        scores = jnp.where(mask, scores, -jnp.inf)
        any_allowed = mask.any(-1, keepdims=True)
        scores = jnp.where(any_allowed, scores, 0.0)
        weights = jax.nn.softmax(scores, axis=-1) * any_allowed
    else:
        weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("...e,...ed->...d", weights, values.astype(jnp.float32))
    return FusionOutput(out.astype(values.dtype), weights)


__all__ = ["FusionOutput", "adapter_fusion", "weighted_sum"]
