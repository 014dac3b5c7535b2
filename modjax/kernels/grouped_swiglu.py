"""A SwiGLU expert FFN on the block-padded layout as one op, with its activation fused.

``swiglu_ffn(x, w_gate, w_up, w_out, layout)`` is ``gmm(swiglu(gmm(x, w_gate), gmm(x,
w_up)), w_out)``: three grouped matmuls (:func:`modjax.kernels.grouped_matmul.gmm`, each
rounded to x's dtype) and the activation in float32, rounded to x's dtype. Its gradient
is written out (one ``jax.custom_vjp``): ``dh = dy @ w_out.T``, the activation's backward
in float32, then the projections' input gradients (summed) and the three weight
gradients with ``grouped_matmul``'s primitives.

On a Hopper GPU the activation lives in two kernels' epilogues
(:mod:`modjax.kernels.mgpu_swiglu`): the forward's input projections are one kernel whose
tiles hold the same columns of both and store ``h`` beside them, and the backward's
``dh`` is one kernel that reads its tile of ``gate`` and ``up`` and stores their
gradients; the input gradient of both projections is one contraction (one output, no
sum). Neither ``h`` nor ``dh`` makes a round trip through memory before the
activation, which costs no pass of its own. Elsewhere (and where those kernels' tiles do
not fit) it is the grouped matmuls and the activation as XLA ops.

The reference twin is the composition it replaces, differentiated by JAX
(``tests/kernels/test_grouped_swiglu.py``: values and gradients on CPU and, with
``MODJAX_GPU_TESTS=1``, through the kernels on a GPU).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from modjax.kernels import grouped_matmul as gm
from modjax.typing import Array

#: take the fused Hopper kernels where they apply (False: the grouped matmuls and the
#: activation as XLA ops, the A/B baseline ``benchmarks/moe_layer.py``'s ``dropless+unfused``)
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


def fused_applies(
    x: Array, w_gate: Array, block_size: int, impl: str, interpret: bool, backward: bool = False
) -> bool:
    """Whether :func:`swiglu_ffn` takes its Hopper kernel for these operands: the forward's
    (:func:`~modjax.kernels.mgpu_swiglu.gmm_swiglu`), or with ``backward`` the backward's
    (:func:`~modjax.kernels.mgpu_swiglu.gmm_swiglu_bwd`)."""
    from modjax.kernels import mgpu_block_gmm as bg
    from modjax.kernels import mgpu_gmm, mgpu_swiglu

    if not FUSE or impl not in ("auto", "mgpu") or interpret or not gm._on_gpu():
        return False
    if block_size != bg.BLOCK_M or x.dtype not in bg.DTYPES or w_gate.dtype != x.dtype:
        return False
    if impl == "auto" and not mgpu_gmm.on_hopper():
        return False
    fits = mgpu_swiglu.swiglu_bwd_fits if backward else mgpu_swiglu.swiglu_fits
    return fits(x.shape[1], w_gate.shape[2])


def swiglu_ffn(
    x: Array,
    w_gate: Array,
    w_up: Array,
    w_out: Array,
    layout: gm.GroupLayout,
    *,
    block_size: int,
    impl: str = "auto",
    interpret: bool = False,
) -> Array:
    """A SwiGLU expert FFN, ``(silu(x @ w_gate[g]) * (x @ w_up[g])) @ w_out[g]``, for the rows
    of each group ``g``.

    Args:
      x: ``[Nb * block_size, D]`` rows in block-padded layout.
      w_gate, w_up: ``[G, D, F]``; w_out: ``[G, F, D]``; all in x's dtype.
      layout, block_size, impl, interpret: as :func:`modjax.kernels.grouped_matmul.gmm`
        (``impl`` picks the grouped matmuls; the fused kernels are ``"auto"``'s or
        ``"mgpu"``'s choice on a Hopper GPU, :func:`fused_applies`).

    Returns:
      ``[Nb * block_size, D]`` in x's dtype; rows of unused blocks are zero.
    """
    gm._check_gmm(x, w_gate, layout, block_size, False)
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w_gate {w_gate.shape} and w_up {w_up.shape} must have one shape")
    g, d, f = w_gate.shape
    if w_out.shape != (g, f, d):
        raise ValueError(f"w_out must be [G, F, D] = {(g, f, d)}, got {w_out.shape}")
    static = _Static(block_size, gm._check_impl(impl), interpret)
    return _ffn_core(x, w_gate, w_up, w_out, layout, static)


class _Static(NamedTuple):
    block_size: int
    impl: str
    interpret: bool


jax.tree_util.register_pytree_node(_Static, lambda s: ((), tuple(s)), lambda aux, _: _Static(*aux))


def _gmm(x, w, layout, static, transpose_rhs=False):
    block_size, impl, interpret = static
    return gm._gmm_impl(x, w, layout, block_size, transpose_rhs, impl, interpret)


def _tgmm(x, dy, layout, static, out_dtype):
    block_size, impl, interpret = static
    return gm._tgmm_impl(x, dy, layout, block_size, impl, interpret, out_dtype=out_dtype)


def _forward(x, w_gate, w_up, w_out, layout, static):
    """``(y, (h, gate, up))``."""
    if fused_applies(x, w_gate, static.block_size, static.impl, static.interpret):
        from modjax.kernels import mgpu_swiglu

        h, gate, up = mgpu_swiglu.gmm_swiglu(x, w_gate, w_up, layout.block_group,
                                             layout.group_start[-1])  # fmt: skip
    else:
        gate, up = _gmm(x, w_gate, layout, static), _gmm(x, w_up, layout, static)
        h = swiglu(gate, up)
    return _gmm(h, w_out, layout, static), (h, gate, up)


@jax.custom_vjp
def _ffn_core(x, w_gate, w_up, w_out, layout, static):
    return _forward(x, w_gate, w_up, w_out, layout, static)[0]


def _ffn_fwd(x, w_gate, w_up, w_out, layout, static):
    y, hidden = _forward(x, w_gate, w_up, w_out, layout, static)
    return y, (x, w_gate, w_up, w_out, layout, static, hidden)


def _ffn_bwd(res, dy):
    from modjax.kernels import mgpu_swiglu

    x, w_gate, w_up, w_out, layout, static, (h, gate, up) = res
    dy = dy.astype(x.dtype)
    if fused_applies(x, w_gate, static.block_size, static.impl, static.interpret, True):
        dgate, dup = mgpu_swiglu.gmm_swiglu_bwd(dy, w_out, gate, up, layout.block_group,
                                                layout.group_start[-1])  # fmt: skip
    else:
        dgate, dup = swiglu_grad(_gmm(dy, w_out, layout, static, transpose_rhs=True), gate, up)
    dw_out = _tgmm(h, dy, layout, static, w_out.dtype)
    if fused_applies(x, w_gate, static.block_size, static.impl, static.interpret) and (
        mgpu_swiglu.sum_t_fits(w_gate.shape[2], x.shape[1])
    ):
        dx = mgpu_swiglu.gmm_sum_t((dgate, dup), (w_gate, w_up), layout.block_group,
                                   layout.group_start[-1])  # fmt: skip
    else:
        dx = _gmm(dgate, w_gate, layout, static, True) + _gmm(dup, w_up, layout, static, True)
    dw_gate = _tgmm(x, dgate, layout, static, w_gate.dtype)
    dw_up = _tgmm(x, dup, layout, static, w_up.dtype)
    return dx, dw_gate, dw_up, dw_out, None, None


_ffn_core.defvjp(_ffn_fwd, _ffn_bwd)

__all__ = ["FUSE", "fused_applies", "swiglu", "swiglu_ffn", "swiglu_grad"]
