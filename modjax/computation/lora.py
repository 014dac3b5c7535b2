"""LoRA: a low-rank update of a weight matrix (Hu et al. 2021, "LoRA: Low-Rank Adaptation
of Large Language Models").

A frozen weight ``W [D, F]`` is adapted as ``W + (alpha / R) * A @ B`` with ``A [D, R]``
and ``B [R, F]``; ``B`` starts at zero so the adapted model starts equal to the base.
The update can be applied on the fly (:func:`lora_apply`, cost ``O(R (D + F))`` per token)
or merged into the weight (:func:`merge_lora`) and removed again (:func:`unmerge_lora`).

Example:
  >>> a, b = jnp.ones((8, 2)), jnp.zeros((2, 4))
  >>> lora_apply(jnp.ones((3, 8)), a, b, lora_scaling(16.0, 2)).shape
  (3, 4)
"""

from __future__ import annotations

import jax.numpy as jnp

from modjax.typing import Array


def lora_scaling(alpha: float, rank: int) -> float:
    """The LoRA scale ``alpha / rank``.

    Args:
      alpha: the LoRA alpha (a float; ``alpha = rank`` gives scale 1).
      rank: the rank R, a positive int.
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    return float(alpha) / rank


def _check_factors(a: Array, b: Array) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"lora factors must be a [D, R] and b [R, F], got a {a.shape} and b {b.shape}"
        )


def lora_delta(a: Array, b: Array, scaling: float) -> Array:
    """The dense update ``scaling * a @ b``.

    Args:
      a: ``[D, R]`` down projection.
      b: ``[R, F]`` up projection.
      scaling: ``alpha / R`` (see :func:`lora_scaling`).

    Returns:
      ``[D, F]`` in the result dtype of ``a @ b``.
    """
    _check_factors(a, b)
    return scaling * (a @ b)


def lora_apply(x: Array, a: Array, b: Array, scaling: float) -> Array:
    """The low-rank path ``scaling * (x @ a) @ b``, computed without forming ``a @ b``.

    Args:
      x: ``[..., D]``.
      a: ``[D, R]``.
      b: ``[R, F]``.
      scaling: ``alpha / R``.

    Returns:
      ``[..., F]``: add it to the base layer's output ``x @ W``.
    """
    _check_factors(a, b)
    if x.shape[-1] != a.shape[0]:
        raise ValueError(f"x width {x.shape[-1]} does not match lora a {a.shape}")
    return scaling * ((x @ a) @ b)


def merge_lora(w: Array, a: Array, b: Array, scaling: float) -> Array:
    """``w + scaling * a @ b`` reshaped to ``w``'s shape, in ``w``'s dtype.

    Args:
      w: ``[D, F]``, or any shape whose leading axes multiply to D and trailing axes to F
        (e.g. an attention kernel ``[D, H, Dh]`` with ``F = H * Dh``).
      a: ``[D, R]``.
      b: ``[R, F]``.
      scaling: ``alpha / R``.
    """
    delta = lora_delta(a, b, scaling)
    if delta.size != w.size:
        raise ValueError(f"lora update {delta.shape} does not fit weight w {w.shape}")
    return (w + delta.reshape(w.shape).astype(jnp.promote_types(w.dtype, delta.dtype))).astype(
        w.dtype
    )


def unmerge_lora(w: Array, a: Array, b: Array, scaling: float) -> Array:
    """The inverse of :func:`merge_lora`: ``w - scaling * a @ b`` (exact up to rounding)."""
    return merge_lora(w, a, -b, scaling)


__all__ = ["lora_apply", "lora_delta", "lora_scaling", "merge_lora", "unmerge_lora"]
