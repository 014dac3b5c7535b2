"""The row-move kernels (``modjax.kernels.pallas_rows``) against their reference twins,
XLA's gathers in ``grouped_matmul``: the kernels alone and the moves' values and
gradients through ``to_blocks`` / ``combine_from_blocks``, in interpret mode on CPU
(random, skewed and empty routing, dropped assignments, k = 1..4, token counts and widths
that are multiples of no tile); which moves ``impl`` picks; that they lower for CUDA. With
``MODJAX_GPU_TESTS=1`` on a GPU, the compiled kernels in bf16.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.kernels import grouped_matmul as gm
from modjax.kernels import pallas_rows as pr
from tests.kernels.routing_cases import group_ids

GPU = os.environ.get("MODJAX_GPU_TESTS") == "1"


def _case(kind, t, d, g, k, bs, dtype, seed=0, drop=0.2):
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(group_ids(kind, t * k, g, rng), jnp.int32)
    valid = jnp.asarray(rng.random(t * k) >= drop)
    position, source, _ = gm.sort_to_blocks(ids, g, bs, valid)
    x = jnp.asarray(rng.normal(size=(t, d)), dtype)
    yp = jnp.asarray(rng.normal(size=(source.shape[0], d)), dtype)
    w = jnp.asarray(rng.random((t, k)), jnp.float32)
    return x, yp, w, position, source, valid


def _close(a, b, dtype):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if dtype == jnp.float32:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        return
    # bf16: XLA keeps f32 inside its fusions (excess precision) where the kernels' path
    # rounds its operands to bf16, so sums of many such products differ by more than an
    # ulp (0.09 at 0.46 in a 32-term dot seen on a GPU); a wrong or missing row would
    # be off by the values' own size
    np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize("k,split", [(1, 1), (2, 3), (3, 1), (4, 3)])
def test_kernels_match_their_formulas_in_interpret_mode(kind, k, split):
    t, d, g, bs = 37, 48, 5, 16  # 37 tokens: no whole token block; 48: 3 pieces of 16
    x, yp, w, position, source, valid = _case(kind, t, d, g, k, bs, jnp.float32, seed=k)
    pos = gm._assignments(position, valid, k)
    # several programs per axis, ragged last ones; split=3: a program per piece
    tiles = {"bt": 8, "bd": 32, "br": 16, "split": split}
    # scatter: the layout's input, padding rows zero (a NaN-free check of every row)
    got = pr.scatter_rows(x, pos, source, interpret=True, tiles=tiles)
    _close(got, gm.to_blocks_reference(x, source, position, valid, k), jnp.float32)
    # scaled, with the dot products of the combine's gradient
    dyp, dw = pr.scatter_rows(x, pos, source, w, dot_with=yp, interpret=True, tiles=tiles)
    w_row = jnp.take(w.reshape(-1), source, mode="fill", fill_value=0)
    _close(dyp, gm.to_blocks_reference(x, source, position, valid, k) * w_row[:, None],
           jnp.float32)  # fmt: skip
    rows = gm.from_blocks_reference(yp, position, source, valid).reshape(t, k, d)
    _close(dw, jnp.einsum("tkd,td->tk", rows, x), jnp.float32)
    # gather-sum: the combine, weighted and not
    got = pr.gather_sum(yp, pos, w, interpret=True, tiles=tiles)
    _close(got, gm.combine_from_blocks_reference(yp, w, position, source, valid, jnp.float32),
           jnp.float32)  # fmt: skip
    _close(pr.gather_sum(yp, pos, interpret=True, tiles=tiles), rows.sum(1), jnp.float32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind,k", [("random", 1), ("skewed", 2), ("empty", 3), ("random", 4)])
def test_moves_with_kernels_match_xla_values_and_grads(kind, k, dtype):
    # to_blocks then the combine, differentiated: kernels (interpret) against XLA's gathers
    t, d, g, bs = 29, 32, 6, 8
    x, _, w, position, source, valid = _case(kind, t, d, g, k, bs, dtype, seed=5 + k)
    rng = np.random.default_rng(1)
    scale = jnp.asarray(rng.normal(size=(source.shape[0], d)), dtype)
    probe = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)

    def loss(impl, interpret):
        def f(x, w, scale):
            xp = gm.to_blocks(x, source, position, valid, k, impl=impl, interpret=interpret)
            yp = xp * scale + jnp.sin(xp)
            y = gm.combine_from_blocks(yp, w, position, source, valid, x.dtype, impl=impl,
                                       interpret=interpret)  # fmt: skip
            return jnp.sum(jnp.cos(y.astype(jnp.float32)) * probe)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

    got = loss("pallas", True)(x, w, scale)
    want = loss("xla", False)(x, w, scale)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        _close(a, b, dtype)


def test_impl_picks_the_row_moves(monkeypatch):
    x = jnp.zeros((4, 32), jnp.bfloat16)
    modes = lambda impl, interpret=False, a=x: tuple(gm._row_modes(impl, interpret, a))
    monkeypatch.setattr(gm, "_on_gpu", lambda: False)  # whatever backend runs the tests
    assert modes("auto") == ("xla", "xla")
    assert modes("pallas") == ("xla", "xla")  # compiled kernels need a GPU
    assert modes("xla", True) == ("xla", "xla")
    assert modes("pallas", True) == ("interpret", "interpret")
    assert modes("pallas", True, jnp.zeros((4, 40))) == ("xla", "xla")  # not 16-wide pieces
    assert modes("pallas", True, jnp.zeros((4, 32), jnp.int32)) == ("xla", "xla")
    monkeypatch.setattr(gm, "_on_gpu", lambda: True)
    assert modes("auto") == ("pallas", "xla")  # the scatters; XLA's gathers sum faster
    assert modes("pallas") == ("pallas", "pallas")
    assert modes("auto", True) == ("interpret", "xla")
    monkeypatch.setattr(gm, "GATHER_KERNELS", True)
    assert modes("auto") == ("pallas", "pallas")
    monkeypatch.setattr(gm, "ROW_KERNELS", False)
    assert modes("auto") == ("xla", "xla")


def test_kernels_lower_for_cuda_and_check_widths():
    t, d, k, p = 100, 64, 8, 1024
    x = jax.ShapeDtypeStruct((t, d), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((t, k), jnp.int32)
    src = jax.ShapeDtypeStruct((p,), jnp.int32)
    w = jax.ShapeDtypeStruct((t, k), jnp.float32)
    yp = jax.ShapeDtypeStruct((p, d), jnp.bfloat16)
    cases = [
        (lambda x, pos, src, w, yp: pr.scatter_rows(x, pos, src, w, dot_with=yp), 1),
        (lambda x, pos, src, w, yp: pr.gather_sum(yp, pos, w), 1),
    ]
    for fn, n in cases:
        text = jax.jit(fn).trace(x, pos, src, w, yp).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("__gpu$xla.gpu.triton") == n, text[:2000]
    with pytest.raises(ValueError, match="D=40 must be a multiple of 16"):
        pr.gather_sum(jnp.zeros((p, 40)), jnp.zeros((t, k), jnp.int32))
    with pytest.raises(ValueError, match="tiles split=0 must be at least 1"):
        pr.scatter_rows(jnp.zeros((t, d)), jnp.zeros((t, k), jnp.int32),
                        jnp.zeros((p,), jnp.int32), tiles={"split": 0})  # fmt: skip


@pytest.mark.skipif(not GPU, reason="compiled Triton kernels need a GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize("t,d,k", [(1000, 512, 2), (777, 2048, 8), (300, 80, 3)])
@pytest.mark.parametrize("tiles", [{}, {"split": 4}, {"bt": 4, "bd": 2048, "num_warps": 4}])
def test_compiled_kernels_match_xla_on_gpu(kind, t, d, k, tiles, monkeypatch):
    for name in ("SCATTER_TILES", "GATHER_TILES"):  # read when traced, below
        monkeypatch.setattr(pr, name, {**getattr(pr, name), **tiles})
    x, _, w, position, source, valid = _case(kind, t, d, 16, k, 128, jnp.bfloat16, seed=t)
    rng = np.random.default_rng(2)
    probe = jnp.asarray(rng.normal(size=(t, d)), jnp.bfloat16)

    def moves(impl):  # the combine's output, and the gradients of x and the weights
        def f(x, w):
            xp = gm.to_blocks(x, source, position, valid, k, impl=impl)
            return gm.combine_from_blocks(jnp.tanh(xp), w, position, source, valid, impl=impl)

        def run(x, w):
            y, vjp = jax.vjp(f, x, w)
            return (y, *vjp(probe))

        return jax.jit(run)

    xp = jax.jit(lambda x: gm.to_blocks(x, source, position, valid, k, impl="pallas"))(x)
    np.testing.assert_array_equal(  # a copy: exact, and zero on every padding row
        np.asarray(xp, np.float32),
        np.asarray(gm.to_blocks_reference(x, source, position, valid, k), np.float32),
    )
    for a, b in zip(moves("pallas")(x, w), moves("xla")(x, w)):
        _close(a, b, jnp.bfloat16)
