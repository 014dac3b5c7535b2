"""(IA)^3: learned rescaling vectors (Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning").

(IA)^3 multiplies activations elementwise by a learned vector ``l`` initialised to ones:
the keys and values of attention (``l_k``, ``l_v``) and the hidden FFN activation
(``l_ff``). Because the scaling is linear it can be folded into the producing weight
(:func:`merge_ia3`).
"""

from __future__ import annotations

import jax.numpy as jnp

from modjax.typing import Array


def ia3_scale(x: Array, scale: Array) -> Array:
    """``x * scale`` with ``scale`` broadcast over the trailing axes of ``x``.

    Args:
      x: ``[..., *S]`` activations, e.g. keys ``[B, T, H, Dh]`` or FFN hidden ``[B, T, F]``.
      scale: ``S``-shaped vector or array (e.g. ``[F]`` or ``[H, Dh]``).

    Returns:
      ``x * scale`` in ``x``'s dtype.
    """
    if scale.ndim > x.ndim or x.shape[x.ndim - scale.ndim :] != scale.shape:
        raise ValueError(f"ia3 scale {scale.shape} must match the trailing axes of x {x.shape}")
    return (x * scale).astype(x.dtype)


def merge_ia3(w: Array, scale: Array) -> Array:
    """Fold an output rescaling into the weight that produces it: ``w * scale``.

    Args:
      w: ``[D, *S]`` weight whose output ``x @ w`` is rescaled.
      scale: ``S``-shaped.
    """
    if w.shape[w.ndim - scale.ndim :] != scale.shape:
        raise ValueError(f"ia3 scale {scale.shape} must match the output axes of w {w.shape}")
    return (w * scale).astype(jnp.result_type(w))


__all__ = ["ia3_scale", "merge_ia3"]
