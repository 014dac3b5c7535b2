"""Routing per group of tokens: split tokens into groups and map a router over them.

Every router in :mod:`modjax.routing` decides over the last two axes ``[T, E]`` and
treats any leading axes as independent groups (the decision, capacity and priority are
computed within each group, GShard-style, Lepikhin et al. 2021). :func:`split_groups`
reshapes a long token axis into ``[G, S]`` groups so capacity is per group of S tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from modjax.typing import Array, PyTree


def split_groups(x: Array, group_size: int, *, axis: int = -2) -> Array:
    """``[..., T, ...] -> [..., G, S, ...]`` with ``S = group_size``, ``G = T // S``.

    Args:
      x: array whose ``axis`` is the token axis T.
      group_size: S, a positive divisor of T.
      axis: the token axis (default -2, as in ``[..., T, D]`` or ``[..., T, E]``).
    Returns:
      ``x`` reshaped so that T becomes ``(G, S)``.
    """
    axis = axis % x.ndim
    t = x.shape[axis]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if t % group_size:
        raise ValueError(f"group_size={group_size} must divide the token axis T={t}")
    return x.reshape(x.shape[:axis] + (t // group_size, group_size) + x.shape[axis + 1 :])


def merge_groups(x: Array, *, axis: int = -3) -> Array:
    """Inverse of :func:`split_groups`: ``[..., G, S, ...] -> [..., G * S, ...]``."""
    axis = axis % x.ndim
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def map_groups(fn: Callable[..., PyTree], num_leading: int, *args: Array) -> PyTree:
    """``fn`` applied to each group: ``jax.vmap`` over ``num_leading`` leading axes.

    Args:
      fn: a router on arrays without the leading axes (e.g. ``[T, E] -> Routing``).
      num_leading: how many leading (group) axes ``args`` share.
      args: arrays with the same ``num_leading`` leading axes (None passes through).
    Returns:
      ``fn``'s pytree result with the leading axes in front of every leaf.
    """
    if num_leading == 0:
        return fn(*args)
    lead = next(a for a in args if a is not None).shape[:num_leading]
    flat = [None if a is None else a.reshape((-1,) + a.shape[num_leading:]) for a in args]
    axes = [None if a is None else 0 for a in flat]
    out = jax.vmap(fn, in_axes=axes)(*flat)
    return jax.tree_util.tree_map(lambda y: y.reshape(lead + y.shape[1:]), out)
