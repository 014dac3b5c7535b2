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
    return (*_input_grads(x, w_gate, w_up, dgate, dup, layout, static), dw_out, None, None)


def _input_grads(x, w_gate, w_up, dgate, dup, layout, static):
    """``(dx, dw_gate, dw_up)`` from the projections' gradients."""
    from modjax.kernels import mgpu_swiglu

    if fused_applies(x, w_gate, static.block_size, static.impl, static.interpret) and (
        mgpu_swiglu.sum_t_fits(w_gate.shape[2], x.shape[1])
    ):
        dx = mgpu_swiglu.gmm_sum_t((dgate, dup), (w_gate, w_up), layout.block_group,
                                   layout.group_start[-1])  # fmt: skip
    else:
        dx = _gmm(dgate, w_gate, layout, static, True) + _gmm(dup, w_up, layout, static, True)
    dw_gate = _tgmm(x, dgate, layout, static, w_gate.dtype)
    dw_up = _tgmm(x, dup, layout, static, w_up.dtype)
    return dx, dw_gate, dw_up


_ffn_core.defvjp(_ffn_fwd, _ffn_bwd)


# --------------------------------------------------------------------------------------
# the FFN and the MoE combine as one op: the combine's weights in the FFN's backward

#: let :func:`combine_in_backward` take :func:`swiglu_ffn_combine` where it applies (False:
#: the FFN and the combine as two ops, ``benchmarks/moe_layer.py``'s ``dropless+nocib``)
COMBINE_IN_BWD = True


def combine_in_backward(
    x: Array, w_gate: Array, block_size: int, impl: str, interpret: bool
) -> bool:
    """Whether the dropless layer takes :func:`swiglu_ffn_combine` for these operands.

    Its backward writes ``w * h`` (``[P, F]``) so as not to read the FFN's output
    (``[P, D]``) back: it reads fewer bytes where ``F < D`` (OLMoE's shape, not Mixtral's).
    Where the backward's Hopper kernel applies (it computes the activation's gradient in its
    epilogue, from unscaled rows), the two-op path keeps that kernel.
    """
    return (
        COMBINE_IN_BWD
        and w_gate.shape[2] < x.shape[1]
        and not fused_applies(x, w_gate, block_size, impl, interpret, backward=True)
    )


def swiglu_ffn_combine(
    x: Array,
    w_gate: Array,
    w_up: Array,
    w_out: Array,
    layout: gm.GroupLayout,
    weight: Array,
    position: Array,
    source: Array,
    valid: Array,
    dtype=None,
    *,
    block_size: int,
    impl: str = "auto",
    interpret: bool = False,
) -> Array:
    """The SwiGLU expert FFN on the layout's rows, then the MoE combine: ``[T, D]``,
    ``combine_from_blocks(swiglu_ffn(x, ...), weight, position, source, valid, dtype)``.

    The same function as those two ops (its reference twin in the tests), with a gradient
    that leaves the FFN's output alone. The combine's own gradient reads every output row
    back for the routing weights' gradient, ``dw[t, j] = <yp[p], dy[t]>`` (``p`` the
    assignment's row). Here the rows of ``dy`` go into the layout unscaled (``dyp``), and
    ``dh = dyp @ w_out.T`` gives ``dw[t, j] = <h[p], dh[p]>``, a sum over ``F`` taken in
    the activation's backward, which reads ``h``'s inputs anyway. The row's weight then
    scales ``dh`` (before the activation's backward) and ``h`` (``w_out``'s gradient is
    ``(w * h).T @ dyp``). The backward keeps neither the FFN's output rows nor ``h``
    (``[P, D]`` and ``[P, F]``: on OLMoE's shape 0.8 of the two ops' 1.9 GB of saved rows).

    Args:
      x, w_gate, w_up, w_out, layout, block_size, impl, interpret: as :func:`swiglu_ffn`.
      weight, position, source, valid, dtype: as
        :func:`modjax.kernels.grouped_matmul.combine_from_blocks`.

    Returns:
      ``[T, D]`` in ``dtype`` (default x's).
    """
    gm.check_combine(weight, position, source, valid, x.shape[0])
    gm._check_gmm(x, w_gate, layout, block_size, False)
    g, d, f = w_gate.shape
    if w_gate.shape != w_up.shape or w_out.shape != (g, f, d):
        raise ValueError(
            f"w_gate {w_gate.shape} and w_up {w_up.shape} must be [G, D, F] and w_out "
            f"{w_out.shape} [G, F, D]"
        )
    static = _CStatic(block_size, gm._check_impl(impl), interpret, jnp.dtype(dtype or x.dtype))
    return _ffn_combine(x, w_gate, w_up, w_out, layout, weight, position, source, valid, static)


class _CStatic(NamedTuple):
    block_size: int
    impl: str
    interpret: bool
    dtype: jnp.dtype

    @property
    def ffn(self) -> _Static:
        return _Static(self.block_size, self.impl, self.interpret)


jax.tree_util.register_pytree_node(
    _CStatic, lambda s: ((), tuple(s)), lambda aux, _: _CStatic(*aux)
)


def _combine_fwd(x, w_gate, w_up, w_out, layout, weight, position, source, valid, static):
    yp, hidden = _forward(x, w_gate, w_up, w_out, layout, static.ffn)
    y = gm.combine_from_blocks(yp, weight, position, source, valid, static.dtype,
                               impl=static.impl, interpret=static.interpret)  # fmt: skip
    return y, hidden


@jax.custom_vjp
def _ffn_combine(x, w_gate, w_up, w_out, layout, weight, position, source, valid, static):
    return _combine_fwd(x, w_gate, w_up, w_out, layout, weight, position, source, valid,
                        static)[0]  # fmt: skip


def _ffn_combine_fwd(x, w_gate, w_up, w_out, layout, weight, position, source, valid, static):
    y, (_, gate, up) = _combine_fwd(x, w_gate, w_up, w_out, layout, weight, position, source,
                                    valid, static)  # fmt: skip
    return y, (x, w_gate, w_up, w_out, layout, weight, position, source, valid, static, gate, up)


def scaled_swiglu_grad(
    dh: Array, gate: Array, up: Array, scale: Array
) -> tuple[Array, Array, Array, Array]:
    """The activation's backward with each row's weight applied after it: for
    ``h = swiglu(gate, up)`` and the unscaled cotangent ``dh``, ``(d gate, d up)`` of the
    cotangent ``scale[:, None] * dh`` (in the inputs' dtypes), ``scale[:, None] * h`` (in
    ``up``'s dtype) and the float32 row sums ``sum_f h * dh``."""
    s = scale.astype(jnp.float32)[:, None]
    h = swiglu(gate, up).astype(jnp.float32)
    rows = jnp.sum(h * dh.astype(jnp.float32), axis=1)
    dgate, dup = swiglu_grad(dh.astype(jnp.float32) * s, gate, up)
    return dgate, dup, (h * s).astype(up.dtype), rows


def _ffn_combine_bwd(res, dy):
    x, w_gate, w_up, w_out, layout, weight, position, source, valid, static, gate, up = res
    t, k = weight.shape
    ffn = static.ffn
    # dy's rows in the layout, unscaled (a scatter: each token row read once on a GPU)
    dyp = gm.to_blocks(dy.astype(x.dtype), source, position, valid, k, impl=static.impl,
                       interpret=static.interpret)  # fmt: skip
    dh = _gmm(dyp, w_out, layout, ffn, transpose_rhs=True)
    # each row's weight as the combine's forward rounds it (zero on the padding rows)
    w_row = gm.row_weights(weight, source, x.dtype)
    dgate, dup, h_scaled, dw_row = scaled_swiglu_grad(dh, gate, up, w_row)
    dw_row = jax.lax.optimization_barrier(dw_row)  # the F-long sums stay out of the gather
    dw = jnp.where(valid, jnp.take(dw_row, position, mode="fill", fill_value=0), 0.0)
    dw_out = _tgmm(h_scaled, dyp, layout, ffn, w_out.dtype)
    dx, dw_gate, dw_up = _input_grads(x, w_gate, w_up, dgate, dup, layout, ffn)
    dw = dw.reshape(t, k).astype(weight.dtype)
    return dx, dw_gate, dw_up, dw_out, None, dw, None, None, None, None


_ffn_combine.defvjp(_ffn_combine_fwd, _ffn_combine_bwd)

__all__ = [
    "COMBINE_IN_BWD",
    "FUSE",
    "combine_in_backward",
    "fused_applies",
    "scaled_swiglu_grad",
    "swiglu",
    "swiglu_ffn",
    "swiglu_ffn_combine",
    "swiglu_grad",
]
