"""SwiGLU's input projections and activation as one op (``modjax.kernels.grouped_swiglu``).

The reference twin is what the op replaces: two grouped matmuls and the activation,
differentiated by JAX. On CPU: values and gradients (x and both weights) with every
grouped-matmul impl, random/skewed/empty groups and rows that fill no whole block; the
fused Hopper kernel and its gradient lower for CUDA; bad input errors. With
``MODJAX_GPU_TESTS=1`` on a Hopper GPU: the kernel's three outputs and the op's gradients
against the reference in bf16.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.computation import ffn
from modjax.kernels import grouped_matmul as gm
from modjax.kernels import grouped_swiglu as gs
from modjax.kernels import mgpu_block_gmm as bg
from tests.kernels.test_mgpu_gmm import _case as _mgpu_case

GPU = os.environ.get("MODJAX_GPU_TESTS") == "1"


def _case(kind="random", m=333, d=64, f=96, g=5, bs=32, dtype=jnp.float32):
    """``(pos, src, layout, x, w_gate, w_up)`` of a routing ``kind``."""
    _, pos, src, layout, x, wg = _mgpu_case(kind, m=m, k=d, n=f, g=g, bs=bs, dtype=dtype)
    wu = (-0.7 * jnp.roll(wg.astype(jnp.float32), 1, axis=-1)).astype(dtype)  # another weight
    return pos, src, layout, x, wg, wu


def _reference(xp, wg, wu, layout, bs, impl="reference", interpret=False):
    proj = {n: gm.gmm(xp, w, layout, block_size=bs, impl=impl, interpret=interpret)
            for n, w in (("wi_gate", wg), ("wi_up", wu))}  # fmt: skip
    return ffn._hidden("swiglu", proj)


def _losses(layout, bs, src, pos, impl, ref_impl="reference", interpret=False):
    """``value_and_grad`` of a loss through the op and through its reference twin."""

    def loss(fn):
        def f(x, wg, wu):
            xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
            h = fn(xp, wg, wu)[pos].astype(jnp.float32)
            # positive terms (a bf16 sum that cancels would amplify rounding), and a
            # cotangent that differs per element
            scale = 1.0 + jnp.arange(h.size, dtype=jnp.float32).reshape(h.shape) % 7 / 7
            return jnp.sum(h * h * scale)

        return jax.jit(jax.value_and_grad(f, (0, 1, 2)))

    fast = loss(lambda x, a, b: gs.swiglu_gmm(x, a, b, layout, block_size=bs, impl=impl,
                                              interpret=interpret))  # fmt: skip
    return fast, loss(lambda x, a, b: _reference(x, a, b, layout, bs, ref_impl, interpret))


def _assert_close(got, want, rtol):
    (va, ga), (vb, gb) = got, want
    np.testing.assert_allclose(float(va), float(vb), rtol=rtol)
    for a, b in zip(ga, gb, strict=True):
        a, b = np.float32(a), np.float32(b)
        assert np.linalg.norm(a - b) <= rtol * np.linalg.norm(b), (a.shape, np.abs(a - b).max())


@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize("impl", ["reference", "xla", "pallas"])
def test_swiglu_gmm_matches_reference_values_and_grads(kind, impl):
    pos, src, layout, x, wg, wu = _case(kind)
    # the twin runs the same grouped matmuls (Pallas in interpret mode on CPU)
    fast, ref = _losses(layout, 32, src, pos, impl, impl, interpret=impl == "pallas")
    _assert_close(fast(x, wg, wu), ref(x, wg, wu), rtol=1e-5)


def test_swiglu_grad_is_the_derivative_of_swiglu():
    rng = np.random.default_rng(1)
    g, u, d = (jnp.asarray(rng.normal(size=(7, 5)) * 3, jnp.float32) for _ in range(3))
    _, vjp = jax.vjp(gs.swiglu, g, u)
    for a, b in zip(gs.swiglu_grad(d, g, u), vjp(d), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_swiglu_gmm_errors_name_the_problem():
    _, src, layout, x, wg, wu = _case()
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
    with pytest.raises(ValueError, match=r"w_gate \(5, 64, 96\) and w_up \(5, 64, 80\) must"):
        gs.swiglu_gmm(xp, wg, wu[..., :80], layout, block_size=32)
    with pytest.raises(ValueError, match="x width 64 does not match w's contracting width 32"):
        gs.swiglu_gmm(xp, wg[:, :32], wu[:, :32], layout, block_size=32)
    with pytest.raises(ValueError, match="impl must be one of"):
        gs.swiglu_gmm(xp, wg, wu, layout, block_size=32, impl="cuda")


def _fake_gpu(monkeypatch):
    monkeypatch.setattr(gm, "_on_gpu", lambda: True)  # lowering only: nothing runs
    cpu = jax.devices()
    monkeypatch.setattr(jax, "devices", lambda *a: [type("Gpu", (), {"core_count": 132})()]
                        if not a else cpu)  # fmt: skip


def test_fused_kernel_is_taken_where_it_fits(monkeypatch):
    sds = jax.ShapeDtypeStruct
    x, w = sds((1024, 512), jnp.bfloat16), sds((8, 512, 2048), jnp.bfloat16)
    if not gm._on_gpu():
        assert not gs.fused_applies(x, w, 128, "auto", False)  # this CPU
    _fake_gpu(monkeypatch)
    from modjax.kernels import mgpu_gmm

    monkeypatch.setattr(mgpu_gmm, "on_hopper", lambda: False)  # e.g. an A100
    assert not gs.fused_applies(x, w, 128, "auto", False)
    monkeypatch.setattr(mgpu_gmm, "on_hopper", lambda: True)
    assert gs.fused_applies(x, w, 128, "auto", False) and gs.fused_applies(x, w, 128, "mgpu", False)
    assert not gs.fused_applies(x, w, 64, "auto", False)  # blocks of 64 rows
    assert not gs.fused_applies(x, w, 128, "pallas", False)
    assert not gs.fused_applies(x, w, 128, "auto", True)  # interpret: Pallas
    x32, w32 = sds((1024, 512), jnp.float32), sds((8, 512, 2048), jnp.float32)
    assert not gs.fused_applies(x32, w32, 128, "auto", False)
    assert not gs.fused_applies(sds((1024, 640), jnp.bfloat16), sds((8, 640, 2048), jnp.bfloat16),
                                128, "auto", False)  # fmt: skip  # 10 steps: not 8k
    assert not gs.fused_applies(x, sds((8, 512, 96), jnp.bfloat16), 128, "auto", False)
    monkeypatch.setattr(gs, "FUSE", False)
    assert not gs.fused_applies(x, w, 128, "auto", False)


def test_fused_kernel_and_its_gradient_lower_for_cuda(monkeypatch):
    _fake_gpu(monkeypatch)
    from modjax.kernels import mgpu_gmm

    monkeypatch.setattr(mgpu_gmm, "on_hopper", lambda: True)
    pos, src, layout, x, wg, wu = _case(m=700, d=512, f=512, g=6, bs=128, dtype=jnp.bfloat16)
    fast, _ = _losses(layout, 128, src, pos, "auto")
    text = fast.trace(x, wg, wu).lower(lowering_platforms=("cuda",)).as_text()
    # forward: one kernel; backward: two input gradients (K = F = 512) and two weight
    # gradients
    assert text.count("custom_call @mosaic_gpu") == 5, text.count("custom_call @mosaic_gpu")


def test_gmm_swiglu_errors_name_the_problem():
    _, src, layout, x, wg, wu = _case(m=700, d=512, f=256, g=6, bs=128, dtype=jnp.bfloat16)
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
    g, u = layout.block_group, layout.group_start[-1]
    with pytest.raises(ValueError, match=r"F \(w_gate width\)=96 must be a multiple of tile_n/2"):
        bg.gmm_swiglu(xp, wg[..., :96], wu[..., :96], g, u)
    with pytest.raises(ValueError, match="w_gate and w_up must match"):
        bg.gmm_swiglu(xp, wg, wu[..., :128], g, u)
    with pytest.raises(ValueError, match="takes a ping-pong tiling, got schedule='cooperative'"):
        bg.gmm_swiglu(xp, wg, wu, g, u, tiles=bg.TILES)
    with pytest.raises(ValueError, match=r"'pingpong' needs K/tile_k = 4 a multiple of"):
        bg.gmm_swiglu(xp[:, :256], wg[:, :256], wu[:, :256], g, u)
    with pytest.raises(ValueError, match="bfloat16 or float16 operands; x is float32"):
        bg.gmm_swiglu(xp.astype(jnp.float32), wg, wu, g, u)
    assert bg.swiglu_fits(512, 256) and not bg.swiglu_fits(512, 96)
    assert bg.swiglu_fits(2048, 1024) and not bg.swiglu_fits(4096, 14336)  # Mixtral: no


@pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels need a Hopper GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize(
    "tiles", [None, bg.SWIGLU_TILES.replace(minor="m"), bg.SWIGLU_TILES.replace(wait=0)],
    ids=["default", "minor-m", "wait0"],
)  # fmt: skip
def test_gmm_swiglu_matches_reference_on_gpu(kind, tiles):
    _, src, layout, x, wg, wu = _case(kind, m=3000, d=512, f=384, g=8, bs=128,
                                      dtype=jnp.bfloat16)  # fmt: skip
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
    h, gate, up = jax.jit(lambda *a: bg.gmm_swiglu(*a, layout.block_group, layout.group_start[-1],
                                                   tiles=tiles))(xp, wg, wu)  # fmt: skip
    want_gate, want_up = (gm.gmm(xp, w, layout, block_size=128, impl="reference") for w in (wg, wu))
    want_h = gs.swiglu(want_gate, want_up)
    for got, want in ((gate, want_gate), (up, want_up), (h, want_h)):
        got, want = np.float32(got), np.float32(want)
        assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want)
    used = int(layout.group_start[-1]) * 128
    assert used < h.shape[0] and all((np.asarray(a[used:]) == 0).all() for a in (h, gate, up))


@pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels need a Hopper GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
def test_swiglu_gmm_values_and_grads_on_gpu(kind):
    pos, src, layout, x, wg, wu = _case(kind, m=3000, d=512, f=768, g=8, bs=128,
                                        dtype=jnp.bfloat16)  # fmt: skip
    assert gs.fused_applies(x, wg, 128, "auto", False)
    fast, ref = _losses(layout, 128, src, pos, "auto")
    _assert_close(fast(x, wg, wu), ref(x, wg, wu), rtol=2e-2)
