"""(IA)^3 layers: learned rescaling vectors (Liu et al. 2022, "Few-Shot Parameter-Efficient
Fine-Tuning is Better and Cheaper than In-Context Learning").

:class:`IA3` is ``x -> x * l`` with ``l`` (an :class:`IA3Param`, initialised to ones)
over the trailing axes; :class:`IA3Scaled` rescales the output of a wrapped sublayer (the
key and value projections and the FFN's first projection in the paper) and can fold the
vector into the sublayer's kernel (``merge``).

Example:
  >>> k_proj = IA3Scaled(nnx.Linear(64, 64, rngs=rngs))
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from modjax.computation import ia3 as ia3_lib
from modjax.layers.lora import kernel_in_dims
from modjax.layers.params import IA3Param
from modjax.typing import Array, DType, Shape


class IA3(nnx.Module):
    """``x * l`` with a learned ``l`` of shape ``features`` (an int or a shape of the
    trailing axes, e.g. ``(H, Dh)``), initialised to ones."""

    def __init__(
        self,
        features: int | Shape,
        *,
        logical_axes: tuple[str | None, ...] | None = None,
        param_dtype: DType = jnp.float32,
    ):
        shape = (features,) if isinstance(features, int) else tuple(features)
        if not shape or any(not isinstance(s, int) or s < 1 for s in shape):
            raise ValueError(f"features must be a positive int or shape, got {features!r}")
        axes = logical_axes if logical_axes is not None else (None,) * len(shape)
        self.scale = IA3Param(jnp.ones(shape, param_dtype), logical_axes=tuple(axes))

    def __call__(self, x: Array) -> Array:
        return ia3_lib.ia3_scale(x, self.scale[...])


class IA3Scaled(nnx.Module):
    """``base(x, ...) * l``: (IA)^3 on the output of a sublayer with output axes ``S``.

    Args:
      base: the wrapped module; ``features`` defaults to its kernel's output axes
        (``[F]`` of a Linear's ``[D, F]``, ``[H, Dh]`` of an einsum kernel ``[D, H, Dh]``).
      features: shape of ``l`` if the default does not apply.
    """

    def __init__(self, base: nnx.Module, *, features: int | Shape | None = None):
        if features is None:
            kernel = getattr(base, "kernel", None)
            if kernel is None:
                raise ValueError(f"features must be given for a base without kernel, got {base!r}")
            features = kernel[...].shape[kernel_in_dims(base) :]
        self.base, self.ia3 = base, IA3(features)

    def __call__(self, x: Array, *args, **kwargs) -> Array:
        return self.ia3(self.base(x, *args, **kwargs))

    def merge(self) -> nnx.Module:
        """Fold ``l`` into the base's kernel and bias (exact for a linear base) and return
        the base, which then computes what this module computed."""
        base = self.base
        base.kernel[...] = ia3_lib.merge_ia3(base.kernel[...], self.ia3.scale[...])
        if getattr(base, "bias", None) is not None:
            base.bias[...] = ia3_lib.ia3_scale(base.bias[...], self.ia3.scale[...])
        return base


__all__ = ["IA3", "IA3Scaled"]
