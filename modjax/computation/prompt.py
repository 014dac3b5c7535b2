"""Input composition: prompt tuning and prefix tuning.

* Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
  Tuning"): ``P`` learned token embeddings ``[P, D]`` are prepended to the input
  embeddings; the attention (padding) mask gains ``P`` always-visible positions.
* Prefix tuning (Li & Liang 2021, "Prefix-Tuning"): every attention layer gets ``P``
  learned keys and values ``[P, H, Dh]`` prepended to its own keys and values; queries
  are unchanged, so the output length stays ``T``.

Masks are boolean ``[B, T]`` (True = attend to this position).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from modjax.typing import Array


class PrefixKV(NamedTuple):
    """Keys and values with a prefix prepended, and the extended mask (None if none)."""

    keys: Array  # [B, P + T, H, Dh]
    values: Array  # [B, P + T, H, Dh]
    mask: Array | None  # [B, P + T]


def extend_mask(mask: Array, prompt_length: int) -> Array:
    """Prepend ``prompt_length`` True columns to a ``[B, T]`` mask -> ``[B, P + T]``."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be [B, T], got shape {mask.shape}")
    if not isinstance(prompt_length, int) or prompt_length < 0:
        raise ValueError(f"prompt_length must be a non-negative int, got {prompt_length!r}")
    ones = jnp.ones((mask.shape[0], prompt_length), dtype=bool)
    return jnp.concatenate([ones, mask.astype(bool)], axis=1)


def prepend_prompt(
    x: Array, prompt: Array, mask: Array | None = None
) -> tuple[Array, Array | None]:
    """Prepend a learned prompt to every sequence of a batch.

    Args:
      x: ``[B, T, D]`` input embeddings.
      prompt: ``[P, D]`` learned prompt embeddings (shared), or ``[B, P, D]`` (per example,
        e.g. chosen by task).
      mask: optional ``[B, T]`` mask.

    Returns:
      ``([B, P + T, D], [B, P + T] or None)``; the prompt is cast to ``x``'s dtype.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be [B, T, D], got shape {x.shape}")
    given = prompt.shape
    if prompt.ndim == 2 and prompt.shape[1] == x.shape[2]:
        prompt = jnp.broadcast_to(prompt[None], (x.shape[0], *prompt.shape))
    if prompt.ndim != 3 or prompt.shape[0] != x.shape[0] or prompt.shape[2] != x.shape[2]:
        raise ValueError(f"prompt must be [P, D] or [B, P, D] for x {x.shape}, got {given}")
    if mask is not None and mask.shape != x.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {x.shape[:2]}, got {mask.shape}")
    out = jnp.concatenate([prompt.astype(x.dtype), x], axis=1)
    return out, None if mask is None else extend_mask(mask, prompt.shape[1])


def prepend_prefix(
    keys: Array,
    values: Array,
    prefix_keys: Array,
    prefix_values: Array,
    mask: Array | None = None,
) -> PrefixKV:
    """Prepend learned prefix keys/values to an attention layer's keys/values.

    Args:
      keys, values: ``[B, T, H, Dh]``.
      prefix_keys, prefix_values: ``[P, H, Dh]``.
      mask: optional ``[B, T]`` key mask.

    Returns:
      :class:`PrefixKV` with ``[B, P + T, H, Dh]`` keys/values and ``[B, P + T]`` mask.
    """
    if keys.ndim != 4 or values.shape != keys.shape:
        raise ValueError(
            f"keys/values must be equal [B, T, H, Dh], got {keys.shape}, {values.shape}"
        )
    want = keys.shape[2:]
    if (
        prefix_keys.ndim != 3
        or prefix_keys.shape[1:] != want
        or prefix_values.shape != prefix_keys.shape
    ):
        raise ValueError(
            f"prefix keys/values must be [P, {want[0]}, {want[1]}], "
            f"got {prefix_keys.shape}, {prefix_values.shape}"
        )
    if mask is not None and mask.shape != keys.shape[:2]:
        raise ValueError(f"mask must be [B, T] = {keys.shape[:2]}, got {mask.shape}")
    b = keys.shape[0]

    def cat(p, x):
        return jnp.concatenate([jnp.broadcast_to(p[None], (b, *p.shape)).astype(x.dtype), x], 1)

    p = prefix_keys.shape[0]
    return PrefixKV(
        cat(prefix_keys, keys),
        cat(prefix_values, values),
        None if mask is None else extend_mask(mask, p),
    )


def attention_with_prefix(
    q: Array,
    keys: Array,
    values: Array,
    prefix_keys: Array,
    prefix_values: Array,
    mask: Array | None = None,
) -> Array:
    """Softmax attention of ``q [B, T, H, Dh]`` over prefix + own keys/values (no causal
    mask; a reference for models that insert the prefix themselves). Returns
    ``[B, T, H, Dh]``."""
    k, v, m = prepend_prefix(keys, values, prefix_keys, prefix_values, mask)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
    if m is not None:
        logits = jnp.where(m[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v)


__all__ = [
    "PrefixKV",
    "attention_with_prefix",
    "extend_mask",
    "prepend_prefix",
    "prepend_prompt",
]
