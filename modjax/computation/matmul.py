"""Low-precision matmuls whose gradients stay low-precision.

The usual way to ask for float32 accumulation,
``jnp.einsum(spec, a, b, preferred_element_type=float32).astype(bf16)``, is harmless
forward but costly backward: the cotangent of ``astype`` is float32, so jax's transpose
of the dot multiplies a float32 cotangent by a bf16 operand, which XLA runs as a float32
matmul (TF32 on NVIDIA GPUs, at half the bf16 rate) after converting the operand to
float32. Measured on an H200: 48 TF32 gemms and their converts, 11 ms of an 82 ms MoE LM
train step, and a dense FFN whose backward ran at half the speed of its forward.

:func:`einsum` multiplies in the operands' dtype and returns that dtype, so its gradient
matmuls do too. Accumulation is float32 all the same: XLA's GPU (cuBLAS compute type) and
TPU backends accumulate bf16 dots in float32, and its CPU backend computes them in float32
and rounds the result (see the tests). :func:`einsum_reference` is the
``preferred_element_type`` formulation; the tests hold the two equal in value and gradient.
It is plain jax (no ``custom_vjp``), so ``vmap``, sharding and remat see an ordinary dot.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array


def _check(a: Array, b: Array) -> None:
    if a.dtype != b.dtype or not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"a and b must share a floating dtype, got a={a.dtype}, b={b.dtype}")


def einsum(spec: str, a: Array, b: Array, out_dtype=None) -> Array:
    """Two-operand ``einsum`` in the operands' (shared, floating) dtype, float32
    accumulation; the result is cast to ``out_dtype`` if given. For an output wider than
    the operands (e.g. float32 logits from bf16), pass it: the dot then produces it
    directly (``preferred_element_type``), and its gradient is computed in that width."""
    _check(a, b)
    if out_dtype is None or jnp.dtype(out_dtype) == a.dtype:
        return jnp.einsum(spec, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=out_dtype)


def einsum_reference(spec: str, a: Array, b: Array, out_dtype=None) -> Array:
    """``einsum(spec, a, b)`` accumulated in float32 explicitly, cast to ``out_dtype``
    (default ``a.dtype``): equal values, float32 gradient matmuls."""
    _check(a, b)
    out = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    return out.astype(out_dtype or a.dtype)


def dot(x: Array, w: Array, out_dtype=None) -> Array:
    """``x [..., K] @ w [K, N]`` by :func:`einsum`, ``w`` cast to ``x.dtype`` first (float32
    parameters, bf16 compute)."""
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"dot: x {x.shape} and w {w.shape} must be [..., K] and [K, N]")
    return einsum("...k,kn->...n", x, w.astype(x.dtype), out_dtype)


__all__ = ["dot", "einsum", "einsum_reference"]
