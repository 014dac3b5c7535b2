"""Sparse fine-tuning layer: a trainable delta on a fixed subset of a base kernel's entries
(diff pruning, Guo et al. 2021; LT-SFT, Ansell et al. 2022).

:class:`SparseDelta` stores only the ``k`` kept entries: ``values [k]``
(:class:`SparseDeltaParam`) at flat ``indices [k]`` (:class:`SparseIndices`, fixed), so
the trainable count and the saved file are ``O(k)``. The mask is chosen beforehand, e.g.
with :func:`modjax.computation.sparse.magnitude_mask` or
:func:`~modjax.computation.sparse.saliency_mask`.

Example:
  >>> mask = magnitude_mask(linear.kernel[...], density=0.01)
  >>> layer = SparseDelta(linear, mask)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from modjax.computation import sparse as sparse_lib
from modjax.layers.lora import base_kernel, kernel_contract
from modjax.layers.params import SparseDeltaParam, SparseIndices
from modjax.typing import Array, ArrayLike, DType


class SparseDelta(nnx.Module):
    """``y = base(x) + x @ (mask * delta)`` (the base's own product, without bias).

    Args:
      base: a module with a ``kernel`` (``nnx.Linear``, ``nnx.Einsum``, ...).
      mask: boolean, the kernel's shape (concrete: the kept positions are fixed here).
      param_dtype: dtype of the delta values (initialised to zero).
    """

    def __init__(self, base: nnx.Module, mask: ArrayLike, *, param_dtype: DType = jnp.float32):
        kernel = base_kernel(base)
        mask = np.asarray(mask)
        if mask.shape != kernel[...].shape or mask.dtype != np.bool_:
            raise ValueError(
                f"mask must be a boolean array of the kernel's shape {kernel[...].shape}, "
                f"got {mask.dtype} {mask.shape}"
            )
        self.base = base
        idx = np.flatnonzero(mask).astype(np.int32)
        self.indices = SparseIndices(jnp.asarray(idx))
        self.values = SparseDeltaParam(jnp.zeros(idx.shape, param_dtype))

    def delta(self) -> Array:
        """The dense delta ``[*kernel.shape]`` (zero off the mask)."""
        shape = base_kernel(self.base)[...].shape
        flat = jnp.zeros((int(np.prod(shape)),), self.values[...].dtype)
        return flat.at[self.indices[...]].set(self.values[...]).reshape(shape)

    def __call__(self, x: Array, *args, **kwargs) -> Array:
        y = self.base(x, *args, **kwargs)
        return y + kernel_contract(self.base, x, self.delta()).astype(y.dtype)

    def merge(self) -> nnx.Module:
        """Add the delta into the base kernel and return the base (which then computes
        what this module computed)."""
        kernel = base_kernel(self.base)
        mask = jnp.zeros(kernel[...].size, bool).at[self.indices[...]].set(True)
        kernel[...] = sparse_lib.apply_sparse_delta(
            kernel[...], self.delta(), mask.reshape(kernel[...].shape)
        )
        return self.base


__all__ = ["SparseDelta"]
