"""Sparse fine-tuning: a trainable weight delta restricted to a fixed sparse mask.

``W' = W + mask * delta`` with a boolean ``mask`` of W's shape (diff pruning, Guo et al.
2021, "Parameter-Efficient Transfer Learning with Diff Pruning"; LT-SFT, Ansell et al.
2022, "Composable Sparse Fine-Tuning"). The mask keeps the ``k = round(density * size)``
entries of highest score:

* magnitude: ``|x|`` of a tensor (e.g. the change of a dense fine-tuning run, as in
  LT-SFT, or the weight itself);
* saliency: ``|w * dL/dw|``, the connection sensitivity of SNIP (Lee et al. 2019,
  "SNIP: Single-shot Network Pruning based on Connection Sensitivity").

Ties are broken towards the lower flat index, so masks are deterministic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from modjax.typing import Array


def num_kept(size: int, density: float) -> int:
    """``round(density * size)``, the number of entries a mask keeps."""
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 <= density <= 1:
        raise ValueError(f"density must be a float in [0, 1], got {density!r}")
    return int(round(density * size))


def top_k_mask(scores: Array, density: float) -> Array:
    """A boolean mask of ``scores``' shape, True at its ``round(density * size)`` largest.

    Args:
      scores: any shape; NaN scores are never kept.
      density: fraction of entries kept, in ``[0, 1]`` (a Python float).
    """
    k = num_kept(scores.size, density)
    flat = scores.reshape(-1).astype(jnp.float32)
    flat = jnp.where(jnp.isnan(flat), -jnp.inf, flat)
    mask = jnp.zeros(flat.shape, bool)
    if k > 0:
        _, idx = jax.lax.top_k(flat, k)
        mask = mask.at[idx].set(True)
    return mask.reshape(scores.shape)


def magnitude_mask(x: Array, density: float) -> Array:
    """Keep the entries of largest ``|x|``: ``top_k_mask(|x|, density)``."""
    return top_k_mask(jnp.abs(x), density)


def saliency_mask(w: Array, grad: Array, density: float) -> Array:
    """Keep the entries of largest SNIP saliency ``|w * grad|``.

    Args:
      w: a weight.
      grad: ``dL/dw``, same shape (e.g. summed over a few batches).
      density: fraction kept.
    """
    if w.shape != grad.shape:
        raise ValueError(f"grad shape {grad.shape} must equal w shape {w.shape}")
    return top_k_mask(jnp.abs(w.astype(jnp.float32) * grad.astype(jnp.float32)), density)


def apply_sparse_delta(w: Array, delta: Array, mask: Array) -> Array:
    """``w + where(mask, delta, 0)`` in ``w``'s dtype (no gradient reaches masked-out
    entries of ``delta``)."""
    if not w.shape == delta.shape == mask.shape:
        raise ValueError(
            f"w, delta and mask must have one shape, got {w.shape}, {delta.shape}, {mask.shape}"
        )
    return (w + jnp.where(mask, delta, jnp.zeros_like(delta))).astype(w.dtype)


__all__ = [
    "apply_sparse_delta",
    "magnitude_mask",
    "num_kept",
    "saliency_mask",
    "top_k_mask",
]
