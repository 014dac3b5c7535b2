"""A SwiGLU expert FFN as one op (``modjax.kernels.grouped_swiglu``) and its Hopper kernels.

The reference twin is what the op replaces: three grouped matmuls and the activation,
differentiated by JAX. On CPU: values and gradients (x and the three weights) with every
grouped-matmul impl, random/skewed/empty groups and rows that fill no whole block; the
fused Hopper kernels lower for CUDA; bad input errors. With ``MODJAX_GPU_TESTS=1`` on a
Hopper GPU: both kernels' outputs and the op's values and gradients against the reference
in bf16.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.computation import ffn
from modjax.kernels import grouped_matmul as gm
from modjax.kernels import grouped_swiglu as gs
from modjax.kernels import mgpu_block_gmm as bg
from modjax.kernels import mgpu_swiglu as ms
from tests.kernels.test_mgpu_gmm import _case as _mgpu_case

GPU = os.environ.get("MODJAX_GPU_TESTS") == "1"


def _case(kind="random", m=333, d=64, f=96, g=5, bs=32, dtype=jnp.float32):
    """``(pos, src, layout, x, (w_gate, w_up, w_out))`` of a routing ``kind``."""
    _, pos, src, layout, x, wg = _mgpu_case(kind, m=m, k=d, n=f, g=g, bs=bs, dtype=dtype)
    w32 = wg.astype(jnp.float32)
    wu = -0.7 * jnp.roll(w32, 1, axis=-1)  # two more weights, from the first
    wo = jnp.swapaxes(jnp.roll(w32, 1, axis=1), 1, 2) * (d / f) ** 0.5
    return pos, src, layout, x, (wg, wu.astype(dtype), wo.astype(dtype))


def _reference(xp, ws, layout, bs, impl="reference", interpret=False):
    mm = functools.partial(gm.gmm, layout=layout, block_size=bs, impl=impl, interpret=interpret)
    wg, wu, wo = ws
    return mm(ffn._hidden("swiglu", {"wi_gate": mm(xp, wg), "wi_up": mm(xp, wu)}), wo)


def _losses(layout, bs, src, pos, impl, ref_impl="reference", interpret=False):
    """``value_and_grad`` of a loss through the op and through its reference twin."""

    def loss(fn):
        def f(x, ws):
            xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
            y = fn(xp, ws)[pos].astype(jnp.float32)
            # positive terms (a bf16 sum that cancels would amplify rounding), and a
            # cotangent that differs per element
            scale = 1.0 + jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape) % 7 / 7
            return jnp.sum(y * y * scale)

        return jax.jit(jax.value_and_grad(f, (0, 1)))

    fast = loss(lambda x, ws: gs.swiglu_ffn(x, *ws, layout, block_size=bs, impl=impl,
                                            interpret=interpret))  # fmt: skip
    return fast, loss(lambda x, ws: _reference(x, ws, layout, bs, ref_impl, interpret))


def _assert_close(got, want, rtol):
    (va, ga), (vb, gb) = got, want
    np.testing.assert_allclose(float(va), float(vb), rtol=rtol)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        a, b = np.float32(a), np.float32(b)
        assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(b), (a.shape, np.abs(a - b).max())


@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_swiglu_ffn_matches_reference_values_and_grads(kind, impl):
    pos, src, layout, x, ws = _case(kind)
    # the twin runs the same grouped matmuls (Pallas in interpret mode on CPU)
    fast, ref = _losses(layout, 32, src, pos, impl, impl, interpret=impl == "pallas")
    _assert_close(fast(x, ws), ref(x, ws), rtol=1e-5)


def test_swiglu_grad_is_the_derivative_of_swiglu():
    rng = np.random.default_rng(1)
    g, u, d = (jnp.asarray(rng.normal(size=(7, 5)) * 3, jnp.float32) for _ in range(3))
    _, vjp = jax.vjp(gs.swiglu, g, u)
    for a, b in zip(gs.swiglu_grad(d, g, u), vjp(d), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_swiglu_ffn_errors_name_the_problem():
    _, src, layout, x, (wg, wu, wo) = _case()
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
    with pytest.raises(ValueError, match=r"w_gate \(5, 64, 96\) and w_up \(5, 64, 80\) must"):
        gs.swiglu_ffn(xp, wg, wu[..., :80], wo, layout, block_size=32)
    with pytest.raises(ValueError, match=r"w_out must be \[G, F, D\] = \(5, 96, 64\), got"):
        gs.swiglu_ffn(xp, wg, wu, wg, layout, block_size=32)
    with pytest.raises(ValueError, match="x width 64 does not match w's contracting width 32"):
        gs.swiglu_ffn(xp, wg[:, :32], wu[:, :32], wo[..., :32], layout, block_size=32)
    with pytest.raises(ValueError, match="impl must be one of"):
        gs.swiglu_ffn(xp, wg, wu, wo, layout, block_size=32, impl="cuda")


def _fake_gpu(monkeypatch):
    from modjax.kernels import mgpu_gmm

    monkeypatch.setattr(gm, "_on_gpu", lambda: True)  # lowering only: nothing runs
    monkeypatch.setattr(mgpu_gmm, "on_hopper", lambda: True)
    cpu = jax.devices()
    monkeypatch.setattr(jax, "devices", lambda *a: [type("Gpu", (), {"core_count": 132})()]
                        if not a else cpu)  # fmt: skip


def test_fused_kernels_are_taken_where_they_fit(monkeypatch):
    sds = jax.ShapeDtypeStruct
    x, w = sds((1024, 512), jnp.bfloat16), sds((8, 512, 2048), jnp.bfloat16)
    if not gm._on_gpu():
        assert not gs.fused_applies(x, w, 128, "auto", False)  # this CPU
    _fake_gpu(monkeypatch)
    from modjax.kernels import mgpu_gmm

    assert gs.fused_applies(x, w, 128, "auto", False) and gs.fused_applies(x, w, 128, "mgpu", False)
    monkeypatch.setattr(mgpu_gmm, "on_hopper", lambda: False)  # e.g. an A100
    assert not gs.fused_applies(x, w, 128, "auto", False)
    monkeypatch.setattr(mgpu_gmm, "on_hopper", lambda: True)
    assert not gs.fused_applies(x, w, 64, "auto", False)  # blocks of 64 rows
    assert not gs.fused_applies(x, w, 128, "pallas", False)
    assert not gs.fused_applies(x, w, 128, "auto", True)  # interpret: Pallas
    x32, w32 = sds((1024, 512), jnp.float32), sds((8, 512, 2048), jnp.float32)
    assert not gs.fused_applies(x32, w32, 128, "auto", False)
    x640, w640 = sds((1024, 640), jnp.bfloat16), sds((8, 640, 2048), jnp.bfloat16)
    assert not gs.fused_applies(x640, w640, 128, "auto", False)  # 10 steps: not 8k
    assert not gs.fused_applies(x, sds((8, 512, 96), jnp.bfloat16), 128, "auto", False)
    assert ms.swiglu_fits(512, 256) and ms.swiglu_fits(2048, 1024)  # small, OLMoE
    assert not ms.swiglu_fits(512, 96) and not ms.swiglu_fits(4096, 14336)  # Mixtral: no
    assert gs.fused_applies(x, w, 128, "auto", False, backward=True)  # K = 512: both
    x2k, w2k = sds((1024, 2048), jnp.bfloat16), sds((8, 2048, 1024), jnp.bfloat16)  # OLMoE
    assert gs.fused_applies(x2k, w2k, 128, "auto", False)  # the forward's kernel only
    assert not gs.fused_applies(x2k, w2k, 128, "auto", False, backward=True)
    assert ms.swiglu_bwd_fits(512, 2048) and not ms.swiglu_bwd_fits(512, 96)
    monkeypatch.setattr(gs, "FUSE", False)
    assert not gs.fused_applies(x, w, 128, "auto", False)


def test_fused_kernels_lower_for_cuda(monkeypatch):
    _fake_gpu(monkeypatch)
    pos, src, layout, x, ws = _case(m=700, d=512, f=512, g=6, bs=128, dtype=jnp.bfloat16)
    fast, _ = _losses(layout, 128, src, pos, "auto")
    text = fast.trace(x, ws).lower(lowering_platforms=("cuda",)).as_text()
    # forward: the projections with the activation, and the output projection; backward:
    # dh with the activation's backward, the input gradient of both projections and
    # three weight gradients
    assert text.count("custom_call @mosaic_gpu") == 7, text.count("custom_call @mosaic_gpu")
    monkeypatch.setattr(ms, "SUM_T", False)  # an input gradient per projection (K = 512)
    fast, _ = _losses(layout, 128, src, pos, "auto")  # a new jit: the flag is read in tracing
    text = fast.trace(x, ws).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 8, text.count("custom_call @mosaic_gpu")


def test_fused_kernels_errors_name_the_problem():
    _, src, layout, x, (wg, wu, wo) = _case(m=700, d=512, f=256, g=6, bs=128,
                                            dtype=jnp.bfloat16)  # fmt: skip
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
    g, u = layout.block_group, layout.group_start[-1]
    with pytest.raises(ValueError, match=r"F \(w_gate width\)=96 must be a multiple of tile_n/2"):
        ms.gmm_swiglu(xp, wg[..., :96], wu[..., :96], g, u)
    with pytest.raises(ValueError, match="w_gate and w_up must match"):
        ms.gmm_swiglu(xp, wg, wu[..., :128], g, u)
    with pytest.raises(ValueError, match="takes a ping-pong tiling, got schedule='cooperative'"):
        ms.gmm_swiglu(xp, wg, wu, g, u, tiles=bg.TILES)
    with pytest.raises(ValueError, match=r"'pingpong' needs K/tile_k = 4 a multiple of"):
        ms.gmm_swiglu(xp[:, :256], wg[:, :256], wu[:, :256], g, u)
    with pytest.raises(ValueError, match="bfloat16 or float16 operands; x is float32"):
        ms.gmm_swiglu(xp.astype(jnp.float32), wg, wu, g, u)
    h = jnp.zeros((xp.shape[0], 256), xp.dtype)
    with pytest.raises(ValueError, match=r"gmm_swiglu_bwd: up must be \(1408, 256\) bfloat16"):
        ms.gmm_swiglu_bwd(xp, wo, h, h[:, :128], g, u)
    with pytest.raises(ValueError, match="gmm_swiglu_bwd takes a ping-pong tiling"):
        ms.gmm_swiglu_bwd(xp, wo, h, h, g, u, tiles=bg.TILES)
    with pytest.raises(ValueError, match=r"'pingpong' needs K/tile_k = 4 a multiple of"):
        ms.gmm_swiglu_bwd(xp[:, :256], wo[..., :256], h, h, g, u)
    with pytest.raises(ValueError, match="gmm_swiglu_bwd with tile_n=128 tile_k=64 stages=4 "):
        ms.gmm_swiglu_bwd(xp, wo, h, h, g, u, tiles=ms.SWIGLU_BWD_TILES.replace(tile_n=128))
    with pytest.raises(ValueError, match="gmm_sum_t takes as many xs as ws, got 2 and 1"):
        ms.gmm_sum_t((h, h), (wg,), g, u)
    with pytest.raises(ValueError, match="gmm_sum_t: the ws must share one shape and dtype"):
        ms.gmm_sum_t((h, h), (wg, wg[..., :128]), g, u)
    with pytest.raises(ValueError, match=r"ws must be \[G, N, K\] with K = the xs' width 256"):
        ms.gmm_sum_t((h, h), (wo, wo), g, u)  # [G, F, D]: the weights not transposed
    with pytest.raises(ValueError, match="gmm_sum_t takes a ping-pong tiling"):
        ms.gmm_sum_t((h, h), (wg, wu), g, u, tiles=bg.TILES)
    with pytest.raises(ValueError, match=r"'pingpong' needs K/tile_k = 4 a multiple of"):
        ms.gmm_sum_t((h[:, :128], h[:, :128]), (wg[..., :128], wu[..., :128]), g, u)
    assert ms.sum_t_fits(1024, 2048) and ms.sum_t_fits(2048, 512)  # OLMoE, small
    assert not ms.sum_t_fits(1024, 200) and not ms.sum_t_fits(96, 512)


@pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels need a Hopper GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize(
    "tiles", [None, ms.SWIGLU_TILES.replace(minor="m"), ms.SWIGLU_TILES.replace(wait=0)],
    ids=["default", "minor-m", "wait0"],
)  # fmt: skip
def test_gmm_swiglu_matches_reference_on_gpu(kind, tiles):
    layout, xp, (wg, wu, _), mm = _gpu_case(kind, d=512, f=384)
    h, gate, up = jax.jit(lambda *a: ms.gmm_swiglu(*a, layout.block_group, layout.group_start[-1],
                                                   tiles=tiles))(xp, wg, wu)  # fmt: skip
    want_gate, want_up = mm(xp, wg), mm(xp, wu)
    _assert_outputs((h, gate, up), (gs.swiglu(want_gate, want_up), want_gate, want_up), layout)


def _gpu_case(kind, d, f):
    """A bf16 case for the kernels: ``(layout, xp, (w_gate, w_up, w_out), mm)``, ``mm`` the
    reference grouped matmul on its layout."""
    _, src, layout, x, ws = _case(kind, m=3000, d=d, f=f, g=8, bs=128, dtype=jnp.bfloat16)
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
    mm = functools.partial(gm.gmm, layout=layout, block_size=128, impl="reference")
    return layout, xp, ws, mm


def _assert_outputs(got, want, layout):
    for a, b in zip(got, want, strict=True):
        a, b = np.float32(a), np.float32(b)
        assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)
    used = int(layout.group_start[-1]) * 128
    assert used < got[0].shape[0] and all((np.asarray(a[used:]) == 0).all() for a in got)


@pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels need a Hopper GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize(
    "tiles", [None, ms.SWIGLU_BWD_TILES.replace(minor="m"), ms.SWIGLU_BWD_TILES.replace(wait=0)],
    ids=["default", "minor-m", "wait0"],
)  # fmt: skip
def test_gmm_swiglu_bwd_matches_reference_on_gpu(kind, tiles):
    layout, xp, (wg, wu, wo), mm = _gpu_case(kind, d=512, f=384)
    gate, up = mm(xp, wg), mm(xp, wu)
    dy = (xp * 0.5).astype(xp.dtype)  # a cotangent of the FFN's output, [rows, D]
    got = jax.jit(lambda *a: ms.gmm_swiglu_bwd(*a, layout.block_group, layout.group_start[-1],
                                               tiles=tiles))(dy, wo, gate, up)  # fmt: skip
    want = gs.swiglu_grad(mm(dy, wo, transpose_rhs=True), gate, up)
    _assert_outputs(got, want, layout)


@pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels need a Hopper GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize(
    "tiles", [None, ms.SUM_T_TILES.replace(minor="m"), ms.SUM_T_TILES.replace(tile_n=64)],
    ids=["default", "minor-m", "n64"],
)  # fmt: skip
def test_gmm_sum_t_matches_reference_on_gpu(kind, tiles):
    layout, xp, (wg, wu, _), mm = _gpu_case(kind, d=256, f=512)
    dgate, dup = mm(xp, wg), mm(xp, wu)  # two [rows, F] operands
    got = jax.jit(lambda *a: ms.gmm_sum_t(a[:2], a[2:], layout.block_group,
                                          layout.group_start[-1], tiles=tiles))(
        dgate, dup, wg, wu)  # fmt: skip
    want = mm(dgate, wg, transpose_rhs=True) + mm(dup, wu, transpose_rhs=True)
    _assert_outputs((got,), (want,), layout)


@pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels need a Hopper GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
def test_swiglu_ffn_values_and_grads_on_gpu(kind):
    pos, src, layout, x, ws = _case(kind, m=3000, d=512, f=768, g=8, bs=128, dtype=jnp.bfloat16)
    assert gs.fused_applies(x, ws[0], 128, "auto", False)
    fast, ref = _losses(layout, 128, src, pos, "auto")
    _assert_close(fast(x, ws), ref(x, ws), rtol=2e-2)
