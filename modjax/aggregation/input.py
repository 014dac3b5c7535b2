"""Input aggregation: concatenate the prompts of several modules.

Prompt tuning modules (Lester et al. 2021) compose by concatenation: the prompts of E
modules (for example a task prompt and a language prompt, or the prompts of a learned
subset of modules as in ATTEMPT, Asai et al. 2022) are laid side by side in front of the
input. Per-row masks let each example use a different subset with static shapes: a row
that does not use module e keeps e's positions but masks them out of attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp

from modjax.typing import Array


class PromptConcat(NamedTuple):
    """Concatenated prompts.

    Attributes:
      prompt: ``[P, D]`` when no input was per-example, else ``[B, P, D]``; P = sum P_e.
      mask: bool ``[P]`` or ``[B, P]`` (True = attend to this position).
    """

    prompt: Array
    mask: Array


def concat_prompts(
    prompts: Sequence[Array], masks: Sequence[Array | None] | None = None
) -> PromptConcat:
    """Concatenate E prompts along the prompt-length axis, with their masks.

    Args:
      prompts: E arrays, each ``[P_e, D]`` (shared) or ``[B, P_e, D]`` (per example).
      masks: None (all visible) or E entries, each None, bool ``[P_e]`` or ``[B, P_e]``
        (e.g. ``[B, 1]``-broadcast "row b uses module e" flags).

    Returns:
      :class:`PromptConcat`; batched (``[B, ...]``) if any prompt or mask is.

    Example:
      >>> out = concat_prompts([jnp.ones((2, 8)), jnp.ones((3, 8))])
      >>> out.prompt.shape, out.mask.shape
      ((5, 8), (5,))
    """
    if isinstance(prompts, dict) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(f"prompts must be a non-empty sequence of arrays, got {prompts!r}")
    if masks is not None and (not isinstance(masks, Sequence) or len(masks) != len(prompts)):
        raise ValueError(
            f"masks must be None or one entry per prompt ({len(prompts)}), got {masks!r}"
        )
    masks = [None] * len(prompts) if masks is None else list(masks)
    d = None
    batch = None
    for i, (p, m) in enumerate(zip(prompts, masks)):
        if not hasattr(p, "ndim") or p.ndim not in (2, 3):
            raise ValueError(
                f"prompts[{i}] must be [P, D] or [B, P, D], got shape {getattr(p, 'shape', p)}"
            )
        d = p.shape[-1] if d is None else d
        if p.shape[-1] != d:
            raise ValueError(f"prompts[{i}] has width {p.shape[-1]}, prompts[0] has {d}")
        b_sizes = [p.shape[0]] if p.ndim == 3 else []
        if m is not None:
            m = jnp.asarray(m)
            plen = p.shape[-2]
            if m.ndim not in (1, 2) or m.shape[-1] not in (plen, 1):
                raise ValueError(
                    f"masks[{i}] must be [P] or [B, P] with P = {plen}, got shape {m.shape}"
                )
            if m.ndim == 2:
                b_sizes.append(m.shape[0])
        for b in b_sizes:
            if batch is not None and b != batch:
                raise ValueError(f"prompts/masks[{i}] have batch size {b}, earlier ones {batch}")
            batch = b
    dtype = jnp.result_type(*prompts)
    parts, mask_parts = [], []
    for p, m in zip(prompts, masks):
        plen = p.shape[-2]
        m = jnp.ones((plen,), bool) if m is None else jnp.asarray(m, bool)
        m = jnp.broadcast_to(m, m.shape[:-1] + (plen,))
        if batch is not None:
            p = jnp.broadcast_to(p, (batch, *p.shape[-2:]))
            m = jnp.broadcast_to(m, (batch, plen))
        parts.append(p.astype(dtype))
        mask_parts.append(m)
    return PromptConcat(jnp.concatenate(parts, axis=-2), jnp.concatenate(mask_parts, axis=-1))


def prepend_prompts(
    x: Array,
    prompts: Sequence[Array],
    masks: Sequence[Array | None] | None = None,
    x_mask: Array | None = None,
) -> tuple[Array, Array]:
    """``x [B, T, D]`` -> ``([B, P + T, D], mask [B, P + T])`` with the E prompts
    concatenated (:func:`concat_prompts`) in front, prompts in ``x``'s dtype.

    Args:
      x: ``[B, T, D]`` input embeddings.
      prompts, masks: as in :func:`concat_prompts`.
      x_mask: optional bool ``[B, T]`` mask of ``x`` (all visible if None).
    """
    if not hasattr(x, "ndim") or x.ndim != 3:
        raise ValueError(f"x must be [B, T, D], got shape {getattr(x, 'shape', x)}")
    b, t, d = x.shape
    cat = concat_prompts(prompts, masks)
    if cat.prompt.shape[-1] != d:
        raise ValueError(f"prompts have width {cat.prompt.shape[-1]}, x has D = {d}")
    if cat.prompt.ndim == 3 and cat.prompt.shape[0] != b:
        raise ValueError(f"prompts have batch size {cat.prompt.shape[0]}, x has B = {b}")
    if x_mask is None:
        x_mask = jnp.ones((b, t), bool)
    elif jnp.shape(x_mask) != (b, t):
        raise ValueError(f"x_mask must be [B, T] = {(b, t)}, got shape {jnp.shape(x_mask)}")
    plen = cat.prompt.shape[-2]
    prompt = jnp.broadcast_to(cat.prompt, (b, plen, d)).astype(x.dtype)
    mask = jnp.broadcast_to(cat.mask, (b, plen))
    out = jnp.concatenate([prompt, x], axis=1)
    return out, jnp.concatenate([mask, jnp.asarray(x_mask, bool)], axis=1)


__all__ = ["PromptConcat", "concat_prompts", "prepend_prompts"]
