"""Argument checks shared by the routers: they run at trace time, before any compute.

Each raises a ValueError (or TypeError) that names the argument and shows the bad value.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from modjax.typing import Array


def check_scores(name: str, x, *, min_rank: int = 2, num_experts: int | None = None) -> Array:
    """``x`` as an array if it is a float array of rank >= ``min_rank`` (last axis E)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}: {x!r}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array, got dtype {x.dtype} (shape {x.shape})")
    if x.ndim < min_rank:
        raise ValueError(f"{name} must have rank >= {min_rank} ([..., T, E]), got shape {x.shape}")
    if x.shape[-1] < 1 or (x.ndim >= 2 and x.shape[-2] < 1):
        raise ValueError(f"{name} must have at least one token and one expert, got {x.shape}")
    if num_experts is not None and x.shape[-1] != num_experts:
        raise ValueError(f"{name} must have E={num_experts} on its last axis, got {x.shape}")
    return jnp.asarray(x)


def check_ids(name: str, ids, shape: tuple[int, ...] | None = None) -> Array:
    """``ids`` as an int array if it is one (of ``shape`` when given)."""
    if not hasattr(ids, "shape") or not hasattr(ids, "dtype"):
        raise TypeError(f"{name} must be an int array, got {type(ids).__name__}: {ids!r}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name} must be an int array, got dtype {ids.dtype}")
    if shape is not None and tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(ids.shape)}")
    return jnp.asarray(ids)


def concrete_value(x) -> np.ndarray | None:
    """The value of ``x`` as numpy when it is known at trace time, else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_known_in_range(name: str, ids: Array, upper: int) -> None:
    """Raise if ``ids`` is known at trace time and has values outside ``[0, upper)``.

    Traced ids cannot be checked; callers clip them and drop what was out of range.
    """
    known = concrete_value(ids)
    if known is not None and known.size and (known.min() < 0 or known.max() >= upper):
        bad = known[(known < 0) | (known >= upper)]
        raise ValueError(f"{name} must be in [0, {upper}), got values {bad[:8]}")


def check_k(k, num_experts: int, *, name: str = "k") -> int:
    """``k`` if it is an int in ``[1, num_experts]``."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}: {k!r}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"{name} must be in [1, num_experts={num_experts}], got {k!r}")
    return int(k)


def check_positive(name: str, value, *, allow_none: bool = False, integer: bool = False):
    """``value`` if it is a positive finite number (or None when allowed)."""
    if value is None and allow_none:
        return None
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}: {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


def resolve_capacity(
    num_tokens: int, num_experts: int, k: int, capacity_factor, capacity
) -> int | None:
    """Slots per expert: ``capacity``, or ``ceil(capacity_factor * T * k / E)``, or None."""
    check_positive("capacity_factor", capacity_factor, allow_none=True)
    check_positive("capacity", capacity, allow_none=True, integer=True)
    if capacity_factor is not None and capacity is not None:
        raise ValueError(
            f"give capacity_factor or capacity, not both; got capacity_factor="
            f"{capacity_factor!r}, capacity={capacity!r}"
        )
    if capacity is not None:
        return int(capacity)
    if capacity_factor is not None:
        return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))
    return None
