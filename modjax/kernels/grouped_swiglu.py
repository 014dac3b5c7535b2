"""A SwiGLU expert FFN's input projections and activation on the block-padded layout.

``swiglu_gmm(x, w_gate, w_up, layout)`` is ``silu(gmm(x, w_gate)) * gmm(x, w_up)``: the
two grouped matmuls (:func:`modjax.kernels.grouped_matmul.gmm`, each rounded to x's
dtype) and the activation in float32, rounded to x's dtype. On a Hopper GPU it is one
Mosaic GPU kernel (:func:`modjax.kernels.mgpu_block_gmm.gmm_swiglu`): each output tile
holds the same columns of both projections, so the epilogue applies the activation and
the hidden rows never make a round trip through memory before it. Elsewhere (and where
that kernel's tiles do not fit) it is the two grouped matmuls and the activation.

Its gradient is written out (one ``jax.custom_vjp``): the activation's backward in
float32, then the two projections' input gradients (summed) and weight gradients with
``grouped_matmul``'s primitives. The reference twin is the composition it replaces,
differentiated by JAX (``tests/kernels/test_grouped_swiglu.py``: values and gradients,
on CPU and, with ``MODJAX_GPU_TESTS=1``, through the kernel on a GPU).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from modjax.kernels import grouped_matmul as gm
from modjax.typing import Array

#: take the fused Hopper kernel where it applies (False: two gmm and the activation, the
#: A/B baseline ``benchmarks/moe_layer.py``'s ``dropless+unfused`` traces)
FUSE = True


def swiglu(gate: Array, up: Array) -> Array:
    """``silu(gate) * up`` in float32, rounded to ``up``'s dtype."""
    h = jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)
    return h.astype(up.dtype)


def swiglu_grad(dh: Array, gate: Array, up: Array) -> tuple[Array, Array]:
    """``(d gate, d up)`` of :func:`swiglu` for the cotangent ``dh``, in float32, rounded to
    the inputs' dtypes."""
    g, u, d = (a.astype(jnp.float32) for a in (gate, up, dh))
    sig = jax.nn.sigmoid(g)
    dgate = d * u * sig * (1.0 + g * (1.0 - sig))
    dup = d * g * sig
    return dgate.astype(gate.dtype), dup.astype(up.dtype)


def fused_applies(x: Array, w_gate: Array, block_size: int, impl: str, interpret: bool) -> bool:
    """Whether :func:`swiglu_gmm` takes the one-kernel path for these operands."""
    from modjax.kernels import mgpu_block_gmm as bg
    from modjax.kernels import mgpu_gmm

    if not FUSE or impl not in ("auto", "mgpu") or interpret or not gm._on_gpu():
        return False
    if block_size != bg.BLOCK_M or x.dtype not in bg.DTYPES or w_gate.dtype != x.dtype:
        return False
    if impl == "auto" and not mgpu_gmm.on_hopper():
        return False
    return bg.swiglu_fits(x.shape[1], w_gate.shape[2])


def swiglu_gmm(
    x: Array,
    w_gate: Array,
    w_up: Array,
    layout: gm.GroupLayout,
    *,
    block_size: int,
    impl: str = "auto",
    interpret: bool = False,
) -> Array:
    """``silu(x @ w_gate[g]) * (x @ w_up[g])`` for the rows of each group ``g``.

    Args:
      x: ``[Nb * block_size, D]`` rows in block-padded layout.
      w_gate, w_up: ``[G, D, F]``.
      layout, block_size, impl, interpret: as :func:`modjax.kernels.grouped_matmul.gmm`
        (``impl`` picks the grouped matmuls; the fused kernel is ``"auto"``'s or
        ``"mgpu"``'s choice on a Hopper GPU).

    Returns:
      ``[Nb * block_size, F]`` in x's dtype; rows of unused blocks are zero.
    """
    gm._check_gmm(x, w_gate, layout, block_size, False)
    gm._check_gmm(x, w_up, layout, block_size, False)
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {w_gate.shape} and w_up {w_up.shape} must have one shape")
    static = _Static(block_size, gm._check_impl(impl), interpret)
    return _swiglu_core(x, w_gate, w_up, layout, static)


class _Static(NamedTuple):
    block_size: int
    impl: str
    interpret: bool


jax.tree_util.register_pytree_node(_Static, lambda s: ((), tuple(s)), lambda aux, _: _Static(*aux))


def _forward(x, w_gate, w_up, layout, static):
    """``(h, gate, up)``."""
    block_size, impl, interpret = static
    if fused_applies(x, w_gate, block_size, impl, interpret):
        from modjax.kernels import mgpu_block_gmm as bg

        return bg.gmm_swiglu(
            x, w_gate, w_up, layout.block_group, layout.group_start[-1], block_size=block_size
        )
    gate, up = (gm._gmm_impl(x, w, layout, block_size, False, impl, interpret)
                for w in (w_gate, w_up))  # fmt: skip
    return swiglu(gate, up), gate, up


@jax.custom_vjp
def _swiglu_core(x, w_gate, w_up, layout, static):
    return _forward(x, w_gate, w_up, layout, static)[0]


def _swiglu_fwd(x, w_gate, w_up, layout, static):
    h, gate, up = _forward(x, w_gate, w_up, layout, static)
    return h, (x, w_gate, w_up, layout, static, gate, up)


def _swiglu_bwd(res, dh):
    x, w_gate, w_up, layout, static, gate, up = res
    block_size, impl, interpret = static
    dgate, dup = swiglu_grad(dh.astype(x.dtype), gate, up)
    dx = sum(gm._gmm_impl(d, w, layout, block_size, True, impl, interpret)
             for d, w in ((dgate, w_gate), (dup, w_up)))  # fmt: skip
    dws = (gm._tgmm_impl(x, d, layout, block_size, impl, interpret, out_dtype=w.dtype)
           for d, w in ((dgate, w_gate), (dup, w_up)))  # fmt: skip
    return (dx.astype(x.dtype), *dws, None, None)


_swiglu_core.defvjp(_swiglu_fwd, _swiglu_bwd)

__all__ = ["FUSE", "fused_applies", "swiglu", "swiglu_gmm", "swiglu_grad"]
