"""The SwiGLU FFN and the MoE combine as one op (``grouped_swiglu.swiglu_ffn_combine``,
whose backward takes the routing weights' gradient from the activation's instead of
reading the FFN's output back) against its reference twin: ``swiglu_ffn`` then
``combine_from_blocks``, differentiated as two ops. Values and gradients (x, the three
weights and the routing weights) with random, skewed and empty routing, dropped
assignments, k = 1..4 and sizes that fill no whole block; the activation's scaled backward
against autodiff; where the layer takes the op; bad input.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.kernels import grouped_matmul as gm
from modjax.kernels import grouped_swiglu as gs
from tests.kernels.routing_cases import group_ids

GPU = os.environ.get("MODJAX_GPU_TESTS") == "1"


def _case(kind, k, t=45, d=40, f=24, g=5, bs=16, dtype=jnp.float32, seed=0, drop=0.2):
    """A routing of ``t`` tokens to ``k`` of ``g`` experts and an FFN with ``F < D``."""
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(group_ids(kind, t * k, g, rng), jnp.int32)
    valid = jnp.asarray(rng.random(t * k) >= drop)
    position, source, layout = gm.sort_to_blocks(ids, g, bs, valid)
    x = jnp.asarray(rng.normal(size=(t, d)), dtype)
    w = lambda *shape: jnp.asarray(rng.normal(size=shape) / shape[1] ** 0.5, dtype)
    weights = (w(g, d, f), w(g, d, f), w(g, f, d))
    route = jnp.asarray(rng.random((t, k)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    return (position, source, valid, layout), x, weights, route, probe


def _value_and_grads(case, one_op, impl, interpret=False, bs=16):
    (position, source, valid, layout), _, _, route, probe = case
    k = route.shape[1]

    def f(x, wg, wu, wo, w):
        xp = gm.to_blocks(x, source, position, valid, k)
        kw = dict(block_size=bs, impl=impl, interpret=interpret)
        if one_op:
            y = gs.swiglu_ffn_combine(xp, wg, wu, wo, layout, w, position, source, valid, **kw)
        else:  # the twin: the two ops, each with its own gradient
            yp = gs.swiglu_ffn(xp, wg, wu, wo, layout, **kw)
            y = gm.combine_from_blocks(yp, w, position, source, valid, impl=impl,
                                       interpret=interpret)  # fmt: skip
        return jnp.sum(y.astype(jnp.float32) * probe)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))


def _assert_close(got, want, rtol):
    (va, ga), (vb, gb) = got, want
    np.testing.assert_allclose(float(va), float(vb), rtol=rtol, atol=rtol)
    for a, b in zip(ga, gb, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b = np.float32(a), np.float32(b)
        assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(b), (a.shape, np.abs(a - b).max())


@pytest.mark.parametrize("kind,k", [("random", 1), ("skewed", 2), ("empty", 3), ("random", 4)])
def test_one_op_matches_the_two_ops_values_and_grads(kind, k):
    case = _case(kind, k, seed=k)
    args = (case[1], *case[2], case[3])
    got = _value_and_grads(case, True, "reference")(*args)
    _assert_close(got, _value_and_grads(case, False, "reference")(*args), rtol=1e-5)
    assert float(jnp.abs(got[1][4]).max()) > 0  # the routing weights' gradient is not lost


def test_one_op_with_the_kernels_in_interpret_mode():
    # the Pallas grouped matmuls and the row kernels (interpreted), k = 2, skewed routing
    case = _case("skewed", 2, t=29, seed=7)
    args = (case[1], *case[2], case[3])
    got = _value_and_grads(case, True, "pallas", interpret=True)(*args)
    _assert_close(got, _value_and_grads(case, False, "reference")(*args), rtol=1e-5)


def test_one_op_in_bf16_matches_the_two_ops():
    case = _case("random", 3, dtype=jnp.bfloat16, seed=3)
    args = (case[1], *case[2], case[3])
    got = _value_and_grads(case, True, "reference")(*args)
    # different rounding: the twin rounds the FFN's output rows, the op the activation's
    # gradient; a lost or misplaced row would be off by its whole size
    _assert_close(got, _value_and_grads(case, False, "reference")(*args), rtol=3e-2)


def test_one_op_saves_neither_the_ffn_output_nor_h_for_the_backward():
    case = _case("random", 3, seed=4)
    (position, source, valid, layout), x, (wg, wu, wo), route, _ = case
    xp = gm.to_blocks(x, source, position, valid, 3)

    def saved_bytes(one_op):
        def f(xp, wg, wu, wo, w):
            if one_op:
                return gs.swiglu_ffn_combine(xp, wg, wu, wo, layout, w, position, source, valid,
                                             block_size=16)  # fmt: skip
            yp = gs.swiglu_ffn(xp, wg, wu, wo, layout, block_size=16)
            return gm.combine_from_blocks(yp, w, position, source, valid)

        _, vjp = jax.vjp(f, xp, wg, wu, wo, route)
        return sum(a.nbytes for a in jax.tree.leaves(vjp) if hasattr(a, "nbytes"))

    p, d, f = xp.shape[0], xp.shape[1], wg.shape[2]
    assert saved_bytes(False) - saved_bytes(True) == (p * d + p * f) * 4  # yp and h, float32


def test_scaled_swiglu_grad_is_the_derivative_of_the_scaled_activation():
    rng = np.random.default_rng(2)
    g, u, d = (jnp.asarray(rng.normal(size=(7, 5)) * 2, jnp.float32) for _ in range(3))
    s = jnp.asarray(rng.normal(size=(7,)), jnp.float32)
    h, vjp = jax.vjp(lambda g, u, s: s[:, None] * gs.swiglu(g, u), g, u, s)
    dgate, dup, h_scaled, rows = gs.scaled_swiglu_grad(d, g, u, s)
    want_dgate, want_dup, want_ds = vjp(d)
    for a, b in [(dgate, want_dgate), (dup, want_dup), (h_scaled, h), (rows, want_ds)]:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_layer_takes_the_op_where_it_reads_fewer_bytes(monkeypatch):
    sds = jax.ShapeDtypeStruct
    olmoe = sds((1024, 2048), jnp.bfloat16), sds((64, 2048, 1024), jnp.bfloat16)
    mixtral = sds((1024, 4096), jnp.bfloat16), sds((8, 4096, 14336), jnp.bfloat16)
    assert gs.combine_in_backward(*olmoe, 128, "auto", False)  # F < D
    assert not gs.combine_in_backward(*mixtral, 128, "auto", False)
    # where the backward's Hopper kernel applies, the two ops keep it
    monkeypatch.setattr(gs, "fused_applies", lambda *a, backward=False: backward)
    assert not gs.combine_in_backward(*olmoe, 128, "auto", False)
    monkeypatch.setattr(gs, "fused_applies", lambda *a, backward=False: False)
    monkeypatch.setattr(gs, "COMBINE_IN_BWD", False)
    assert not gs.combine_in_backward(*olmoe, 128, "auto", False)


def test_one_op_errors_name_the_problem():
    (position, source, valid, layout), x, (wg, wu, wo), route, _ = _case("random", 2)
    xp = gm.to_blocks(x, source, position, valid, 2)
    call = lambda *a, **kw: gs.swiglu_ffn_combine(*a, block_size=16, **kw)
    with pytest.raises(ValueError, match=r"position \(90,\) and valid \(90,\) must be \[T\*k\]"):
        call(xp, wg, wu, wo, layout, route[:, :1], position, source, valid)
    with pytest.raises(ValueError, match=r"source \(10,\) must be \[P\]"):
        call(xp, wg, wu, wo, layout, route, position, source[:10], valid)
    with pytest.raises(ValueError, match=r"w_out \(5, 40, 24\) \[G, F, D\]"):
        call(xp, wg, wu, jnp.swapaxes(wo, 1, 2), layout, route, position, source, valid)
    with pytest.raises(ValueError, match="impl must be one of"):
        call(xp, wg, wu, wo, layout, route, position, source, valid, impl="cuda")


@pytest.mark.skipif(not GPU, reason="the GPU's kernels (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
def test_one_op_on_gpu_matches_the_two_ops_in_bf16(kind):
    # an OLMoE-like width (F < D, where the layer takes the op), the kernels impl="auto" picks
    case = _case(kind, 8, t=600, d=2048, f=1024, g=16, bs=128, dtype=jnp.bfloat16, seed=11)
    assert gs.combine_in_backward(jnp.zeros((8, 2048), jnp.bfloat16), case[2][0], 128, "auto",
                                  False)  # fmt: skip
    args = (case[1], *case[2], case[3])
    got = _value_and_grads(case, True, "auto", bs=128)(*args)
    _assert_close(got, _value_and_grads(case, False, "auto", bs=128)(*args), rtol=3e-2)
