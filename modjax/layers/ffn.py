"""Dense feed-forward layer (SwiGLU or GELU): the FFN of the models and the dense baseline
of the MoE layer."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from modjax.computation import ffn as ffn_lib
from modjax.typing import Array, DType

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_DEFAULT_INIT = nnx.initializers.lecun_normal()


def check_float_dtype(name: str, dtype) -> jnp.dtype:
    """``jnp.dtype(dtype)`` if it is float32/bfloat16/float16, else a ValueError."""
    try:
        dt = jnp.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"{name} must be a float dtype, got {dtype!r}") from err
    if dt not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {dtype!r}")
    return dt


class FeedForward(nnx.Module):
    """``y = FFN(x)``, ``[..., D] -> [..., D]``.

    ``"swiglu"``: ``(silu(x W_gate) * x W_up) W_o`` (Shazeer 2020); ``"gelu"``:
    ``gelu(x W_i) W_o``. Weights are ``nnx.Param`` with logical axes ("embed", "mlp") and
    ("mlp", "embed"); they live in ``param_dtype`` and compute runs in ``dtype`` with
    float32 accumulation.

    Example:
      >>> layer = FeedForward(64, 256, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 8, 64))).shape
      (2, 8, 64)
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        activation: str = "swiglu",
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        kernel_init=_DEFAULT_INIT,
        rngs: nnx.Rngs,
    ):
        for name, v in (("d_model", d_model), ("d_ff", d_ff)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if activation not in ffn_lib.ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ffn_lib.ACTIVATIONS)}, got {activation!r}"
            )
        self.d_model, self.d_ff, self.activation = d_model, d_ff, activation
        self.dtype = check_float_dtype("dtype", dtype)
        self.param_dtype = check_float_dtype("param_dtype", param_dtype)
        names = ffn_lib.ACTIVATIONS[activation]
        for n in names:
            w = kernel_init(rngs.params(), (d_model, d_ff), self.param_dtype)
            setattr(self, n, nnx.Param(w, logical_axes=("embed", "mlp")))
        w = kernel_init(rngs.params(), (d_ff, d_model), self.param_dtype)
        self.wo = nnx.Param(w, logical_axes=("mlp", "embed"))

    def params_dict(self) -> dict[str, Array]:
        names = (*ffn_lib.ACTIVATIONS[self.activation], "wo")
        return {n: getattr(self, n)[...] for n in names}

    def __call__(self, x: Array) -> Array:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x width {x.shape[-1]} does not match d_model={self.d_model}")
        y = ffn_lib.ffn(x.astype(self.dtype), self.params_dict(), activation=self.activation)
        return y


__all__ = ["FeedForward", "check_float_dtype"]
