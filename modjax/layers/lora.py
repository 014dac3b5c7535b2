"""LoRA layers: a low-rank path added to any base module with a ``kernel`` (Hu et al.
2021, "LoRA: Low-Rank Adaptation of Large Language Models").

:class:`LoRA` wraps a base module -- ``nnx.Linear``, ``nnx.Einsum`` or any module with a
``kernel`` Variable ``[D, *out]`` used as ``x @ kernel`` -- and adds
``(alpha / R) * x A B``; the base stays untouched, the factors are :class:`LoRAParam`.
``merge()`` folds the update into the base kernel (no extra inference cost) and
``unmerge()`` takes it out again.

Example:
  >>> layer = LoRA(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), rank=4, rngs=nnx.Rngs(1))
  >>> layer(jnp.ones((2, 16))).shape
  (2, 32)
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from modjax.computation import lora as lora_lib
from modjax.layers.params import LoRAParam
from modjax.typing import Array, DType

#: PEFT's default for A (kaiming-uniform with a = sqrt(5)); B starts at zero.
DEFAULT_A_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
DEFAULT_B_INIT = nnx.initializers.zeros_init()


def base_kernel(base: nnx.Module) -> nnx.Variable:
    """The ``kernel`` Variable of a base module, or a TypeError."""
    kernel = getattr(base, "kernel", None)
    if not isinstance(kernel, nnx.Variable):
        raise TypeError(
            f"base must have a `kernel` Variable (nnx.Linear, nnx.Einsum, ...), "
            f"got {type(base).__name__}"
        )
    return kernel


def kernel_in_dims(base: nnx.Module) -> int:
    """How many leading kernel axes the base contracts with its input (1 for a Linear;
    the contracted axes of an ``nnx.Einsum``, which must lead its kernel)."""
    kernel = base_kernel(base)
    if not isinstance(base, nnx.Einsum):
        return 1
    spec = base.einsum_str.replace(" ", "")
    inputs, out = spec.split("->")
    x_sub, k_sub = inputs.split(",")
    contracted = [c for c in k_sub if c in x_sub and c not in out]
    n = len(contracted)
    if n == 0 or k_sub[:n] != "".join(contracted) or len(k_sub) != kernel[...].ndim:
        raise ValueError(
            f"einsum_str {base.einsum_str!r}: the contracted kernel axes must come first"
        )
    return n


def kernel_contract(base: nnx.Module, x: Array, kernel: Array) -> Array:
    """The base module's weight product with ``kernel`` in place of its own, without bias:
    ``x @ kernel`` for a Linear-like base, its ``einsum_str`` for an ``nnx.Einsum``."""
    if isinstance(base, nnx.Einsum):
        return jnp.einsum(base.einsum_str, x, kernel)
    d = kernel.shape[0]
    if x.shape[-1] != d:
        raise ValueError(f"x width {x.shape[-1]} does not match kernel {kernel.shape}")
    y = x @ kernel.reshape(d, -1)
    return y.reshape(*x.shape[:-1], *kernel.shape[1:])


def _axis_names(kernel: nnx.Variable, in_dims: int) -> tuple[str | None, str | None]:
    axes = kernel.get_metadata().get("logical_axes")
    if axes is None or len(axes) != kernel[...].ndim:
        return None, None
    first = axes[0] if in_dims == 1 else None
    last = axes[-1] if kernel[...].ndim - in_dims == 1 else None
    return first, last


class LoRA(nnx.Module):
    """``y = base(x) + (alpha / R) * x A B`` around a base module with a kernel.

    Args:
      base: the wrapped module (kept as ``self.base``; its parameters are not touched).
      rank: R, a positive int.
      alpha: LoRA alpha; the scale is ``alpha / R`` (default ``alpha = R``: scale 1).
      a_init, b_init: initialisers of ``A [D, R]`` and ``B [R, F]`` (``F`` = product of
        the kernel's output axes); ``B = 0`` makes the wrapped module start equal to
        ``base``.
      param_dtype: dtype of the factors.
      rngs: for ``A``'s initialisation.
    """

    def __init__(
        self,
        base: nnx.Module,
        rank: int,
        *,
        alpha: float | None = None,
        a_init=DEFAULT_A_INIT,
        b_init=DEFAULT_B_INIT,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kernel = base_kernel(base)
        self.scaling = lora_lib.lora_scaling(rank if alpha is None else alpha, rank)
        self.base, self.rank = base, rank
        self.alpha = float(rank if alpha is None else alpha)
        self.in_dims = kernel_in_dims(base)
        shape = kernel[...].shape
        d_in = math.prod(shape[: self.in_dims])
        d_out = math.prod(shape[self.in_dims :])
        in_name, out_name = _axis_names(kernel, self.in_dims)
        self.lora_a = LoRAParam(
            a_init(rngs.params(), (d_in, rank), param_dtype), logical_axes=(in_name, "rank")
        )
        self.lora_b = LoRAParam(
            b_init(rngs.params(), (rank, d_out), param_dtype), logical_axes=("rank", out_name)
        )
        self.merged = False

    def delta(self) -> Array:
        """The update ``(alpha / R) A B`` in the base kernel's shape."""
        kernel = base_kernel(self.base)[...]
        d = lora_lib.lora_delta(self.lora_a[...], self.lora_b[...], self.scaling)
        return d.reshape(kernel.shape)

    def __call__(self, x: Array, *args, **kwargs) -> Array:
        y = self.base(x, *args, **kwargs)
        if self.merged:
            return y
        if isinstance(self.base, nnx.Einsum) or self.in_dims != 1:
            low = kernel_contract(self.base, x, self.delta())
        else:
            low = lora_lib.lora_apply(x, self.lora_a[...], self.lora_b[...], self.scaling)
            low = low.reshape(*low.shape[:-1], *base_kernel(self.base)[...].shape[1:])
        return y + low.astype(y.dtype)

    def merge(self) -> None:
        """Fold the update into the base kernel; calls then skip the low-rank path."""
        if self.merged:
            raise ValueError("merge() called on a LoRA that is already merged")
        kernel = base_kernel(self.base)
        kernel[...] = lora_lib.merge_lora(
            kernel[...], self.lora_a[...], self.lora_b[...], self.scaling
        )
        self.merged = True

    def unmerge(self) -> None:
        """Take the update out of the base kernel again (inverse of :meth:`merge`)."""
        if not self.merged:
            raise ValueError("unmerge() called on a LoRA that is not merged")
        kernel = base_kernel(self.base)
        kernel[...] = lora_lib.unmerge_lora(
            kernel[...], self.lora_a[...], self.lora_b[...], self.scaling
        )
        self.merged = False


class LoRALinear(LoRA):
    """An ``nnx.Linear(in_features, out_features)`` with a LoRA of rank R.

    Example:
      >>> layer = LoRALinear(16, 32, rank=4, rngs=nnx.Rngs(0))
      >>> layer.merge()  # now a plain linear layer with the update folded in
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        alpha: float | None = None,
        use_bias: bool = True,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
        **lora_kwargs,
    ):
        base = nnx.Linear(
            in_features, out_features, use_bias=use_bias, param_dtype=param_dtype, rngs=rngs
        )
        super().__init__(base, rank, alpha=alpha, param_dtype=param_dtype, rngs=rngs, **lora_kwargs)


__all__ = [
    "DEFAULT_A_INIT",
    "DEFAULT_B_INIT",
    "LoRA",
    "LoRALinear",
    "base_kernel",
    "kernel_contract",
    "kernel_in_dims",
]
