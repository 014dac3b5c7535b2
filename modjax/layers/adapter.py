"""Bottleneck adapter layers (Houlsby et al. 2019; Pfeiffer et al. 2021; He et al. 2022).

:class:`Adapter` is the bottleneck itself, ``x -> residual * x + scale * up(act(down(x)))``,
a plain module with ``__call__(x)`` that composes with any mixture. Two wrappers place it
around an existing sublayer (what :mod:`modjax.surgery` inserts):

* :class:`SequentialAdapter`: ``adapter(base(x))`` -- after the sublayer (Houlsby places
  one after attention and one after the FFN, Pfeiffer only after the FFN);
* :class:`ParallelAdapter`: ``base(x) + scale * bottleneck(x)`` -- beside it (He et al.).

Example:
  >>> ffn = SequentialAdapter(FeedForward(64, 256, rngs=rngs), Adapter(64, 8, rngs=rngs))
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from modjax.computation import adapter as adapter_lib
from modjax.layers.params import AdapterParam
from modjax.typing import Array, DType


class Adapter(nnx.Module):
    """A bottleneck adapter ``[..., D] -> [..., D]``.

    Args:
      d_model: D.
      bottleneck_dim: R, the bottleneck width.
      activation: a key of :data:`modjax.computation.adapter.ACTIVATIONS`.
      residual: add the input (True for a sequential adapter, False for a branch).
      out_features: output width of a non-residual branch (default ``d_model``).
      scale: multiplies the bottleneck branch.
      init_std: std of the down projection; the up projection starts at zero, so a
        residual adapter starts as the identity (Houlsby et al.'s near-identity init).
      rngs: for the down projection.
    """

    def __init__(
        self,
        d_model: int,
        bottleneck_dim: int,
        *,
        activation: str = "relu",
        residual: bool = True,
        out_features: int | None = None,
        scale: float = 1.0,
        init_std: float = 1e-2,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        out = d_model if out_features is None else out_features
        for name, v in (
            ("d_model", d_model),
            ("bottleneck_dim", bottleneck_dim),
            ("out_features", out),
        ):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if residual and out != d_model:
            raise ValueError(
                f"a residual adapter keeps the width d_model={d_model}, got out_features={out}"
            )
        adapter_lib.check_activation(activation)
        self.d_model, self.bottleneck_dim = d_model, bottleneck_dim
        self.activation, self.residual, self.scale = activation, residual, float(scale)
        down = init_std * nnx.initializers.normal(1.0)(
            rngs.params(), (d_model, bottleneck_dim), param_dtype
        )
        self.down = AdapterParam(down, logical_axes=("embed", "rank"))
        self.down_bias = AdapterParam(
            jnp.zeros((bottleneck_dim,), param_dtype), logical_axes=("rank",)
        )
        self.up = AdapterParam(
            jnp.zeros((bottleneck_dim, out), param_dtype), logical_axes=("rank", "embed")
        )
        self.up_bias = AdapterParam(jnp.zeros((out,), param_dtype), logical_axes=("embed",))

    def params_dict(self) -> dict[str, Array]:
        return {k: getattr(self, k)[...] for k in adapter_lib.ADAPTER_KEYS}

    def __call__(self, x: Array) -> Array:
        branch = self.scale * adapter_lib.bottleneck(x, self.params_dict(), self.activation)
        return (x + branch if self.residual else branch).astype(x.dtype)


class SequentialAdapter(nnx.Module):
    """``adapter(base(x, ...))``: an adapter after a sublayer. ``adapter`` should be
    residual (the default of :class:`Adapter`)."""

    def __init__(self, base: nnx.Module, adapter: nnx.Module):
        self.base, self.adapter = base, adapter

    def __call__(self, x: Array, *args, **kwargs) -> Array:
        return self.adapter(self.base(x, *args, **kwargs))


class ParallelAdapter(nnx.Module):
    """``base(x, ...) + adapter(x)``: an adapter beside a sublayer, reading its input.
    ``adapter`` should be non-residual (``Adapter(..., residual=False)``)."""

    def __init__(self, base: nnx.Module, adapter: nnx.Module):
        self.base, self.adapter = base, adapter

    def __call__(self, x: Array, *args, **kwargs) -> Array:
        y = self.base(x, *args, **kwargs)
        return y + self.adapter(x).astype(y.dtype)


__all__ = ["Adapter", "ParallelAdapter", "SequentialAdapter"]
