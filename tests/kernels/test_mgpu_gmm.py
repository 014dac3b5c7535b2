"""impl="mgpu": modjax's block kernel and jax's ragged-dot kernels behind grouped matmul.

On CPU: the forward and both gradients trace and lower for CUDA (cross-platform
lowering: shapes, dtypes, tiles and the custom VJP wiring; no numerics), and bad input
errors. With ``MODJAX_GPU_TESTS=1`` on a Hopper GPU: values and gradients against the
reference implementation, random/skewed/empty groups.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.kernels import grouped_matmul as gm
from modjax.kernels import mgpu_gmm
from tests.kernels.routing_cases import group_ids

GPU = os.environ.get("MODJAX_GPU_TESTS") == "1"


def _case(kind="random", m=700, k=256, n=384, g=6, bs=128, dtype=jnp.bfloat16, seed=0):
    rng = np.random.default_rng(seed)
    ids = group_ids(kind, m, g, rng)
    pos, src, layout = gm.sort_to_blocks(jnp.asarray(ids), g, bs)
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    w = jnp.asarray(rng.normal(size=(g, k, n)) / k**0.5, dtype)
    return ids, pos, src, layout, x, w


def _loss(impl, layout, bs, src, pos, transpose=False):
    def f(x, w):
        xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
        y = gm.gmm(xp, w, layout, block_size=bs, transpose_rhs=transpose, impl=impl)[pos]
        return jnp.sum(y.astype(jnp.float32) ** 2)

    return f


@pytest.mark.parametrize("transpose", [False, True])
def test_mgpu_forward_and_gradients_lower_for_cuda(monkeypatch, transpose):
    monkeypatch.setattr(gm, "_on_gpu", lambda: True)  # lowering only: nothing runs
    # the weight-gradient kernel sizes its grid by the device's SM count (an H100/H200's)
    cpu = jax.devices()
    monkeypatch.setattr(jax, "devices", lambda *a: [type("Gpu", (), {"core_count": 132})()]
                        if not a else cpu)  # fmt: skip
    _, pos, src, layout, x, w = _case()
    if transpose:
        w = jnp.swapaxes(w, 1, 2)
    fn = jax.jit(jax.value_and_grad(_loss("mgpu", layout, 128, src, pos, transpose), (0, 1)))
    text = fn.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    # forward, input gradient and weight gradient: three Mosaic GPU kernels
    assert text.count("mosaic_gpu") >= 3, text.count("mosaic_gpu")


def test_mgpu_errors_name_the_problem(monkeypatch):
    _, pos, src, layout, x, w = _case()
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
    if not gm._on_gpu():  # on the H200 (MODJAX_GPU_TESTS=1) the backend is fine
        with pytest.raises(ValueError, match="impl='mgpu' runs on NVIDIA Hopper GPUs only"):
            gm.gmm(xp, w, layout, block_size=128, impl="mgpu")
    monkeypatch.setattr(gm, "_on_gpu", lambda: True)
    with pytest.raises(ValueError, match="takes bfloat16 or float16 operands; x is float32"):
        gm.gmm(xp.astype(jnp.float32), w.astype(jnp.float32), layout, block_size=128,
               impl="mgpu")  # fmt: skip
    with pytest.raises(ValueError, match=r"K \(x width\)=200 must be a multiple of the tile "):
        gm.gmm(xp[:, :200], w[:, :200], layout, block_size=128, impl="mgpu")
    with pytest.raises(ValueError, match=r"N \(output width\)=300 must be a multiple"):
        gm.gmm(xp, w[:, :, :300], layout, block_size=128, impl="mgpu")
    with pytest.raises(ValueError, match=r"N \(dy width\)=100 must be a multiple"):
        gm.tgmm(xp, xp[:, :100], layout, block_size=128, impl="mgpu")
    assert mgpu_gmm.TILES["block_m"] == 128


@pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels need a Hopper GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("n", [768, 640])  # 640: not a multiple of 256, jax's ragged kernel
@pytest.mark.parametrize("tgmm_kernel", ["ragged", "block"])
def test_mgpu_matches_reference_values_and_grads_on_gpu(monkeypatch, kind, transpose, n,
                                                        tgmm_kernel):  # fmt: skip
    monkeypatch.setattr(mgpu_gmm, "TGMM_KERNEL", tgmm_kernel)  # the weight gradient's kernel
    _, pos, src, layout, x, w = _case(kind, m=3000, k=512, n=n, g=8)
    if transpose:
        w = jnp.swapaxes(w, 1, 2)
    fast = jax.jit(jax.value_and_grad(_loss("mgpu", layout, 128, src, pos, transpose), (0, 1)))
    ref = jax.jit(jax.value_and_grad(_loss("reference", layout, 128, src, pos, transpose), (0, 1)))
    (va, ga), (vb, gb) = fast(x, w), ref(x, w)
    np.testing.assert_allclose(float(va), float(vb), rtol=2e-2)
    for a, b in zip(ga, gb):
        a, b = np.float32(a), np.float32(b)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
    out = gm.gmm(xp, w, layout, block_size=128, transpose_rhs=transpose, impl="mgpu")
    used = int(layout.group_start[-1]) * 128
    assert (np.asarray(out[used:]) == 0).all()  # rows the kernel never writes are zeroed
    dw = gm.tgmm(xp, xp, layout, block_size=128, impl="mgpu")
    if kind == "empty":
        assert (np.asarray(dw[1]) == 0).all() and (np.asarray(dw[7]) == 0).all()


def test_auto_takes_mgpu_for_the_weight_gradient_on_hopper_only(monkeypatch):
    x = jnp.zeros((256, 256), jnp.bfloat16)
    dy = jnp.zeros((256, 384), jnp.bfloat16)
    if not gm._on_gpu():
        assert gm._pick("auto", "tgmm", x, dy, 128, False) == "xla"  # this CPU
    monkeypatch.setattr(gm, "_on_gpu", lambda: True)
    monkeypatch.setattr(mgpu_gmm, "on_hopper", lambda: False)  # e.g. an A100
    assert gm._pick("auto", "tgmm", x, dy, 128, False) == "pallas"
    monkeypatch.setattr(mgpu_gmm, "on_hopper", lambda: True)
    assert gm._pick("auto", "tgmm", x, dy, 128, False) == "mgpu"
    w = jnp.zeros((4, 256, 384), jnp.bfloat16)
    assert gm._pick("auto", "gmm", x, w, 128, False) == "pallas"  # N = 384: tiles don't fit
    assert gm._pick("auto", "gmm", x, w[..., :256], 128, False) == "pallas"  # K < 512
    x512 = jnp.zeros((256, 512), jnp.bfloat16)
    w512 = jnp.zeros((4, 512, 256), jnp.bfloat16)
    assert gm._pick("auto", "gmm", x512, w512, 128, False) == "mgpu"  # K = 512: GPU-tested
    sds = jax.ShapeDtypeStruct
    wide = sds((8, 4096, 14336), jnp.bfloat16)  # Mixtral's experts
    xw = sds((1024, 4096), jnp.bfloat16)
    assert gm._pick("auto", "gmm", xw, wide, 128, False) == "mgpu"
    xn = sds((1024, 14336), jnp.bfloat16)  # through wo, transposed: K = 14336, N = 4096
    assert gm._pick("auto", "gmm", xn, wide, 128, False, transpose_rhs=True) == "mgpu"
    olmoe_up, olmoe_down = sds((64, 2048, 1024), jnp.bfloat16), sds((64, 1024, 2048), jnp.bfloat16)
    xo = sds((1024, 2048), jnp.bfloat16)
    assert gm._pick("auto", "gmm", xo, olmoe_up, 128, False) == "mgpu"  # K = 2048
    xf = sds((1024, 1024), jnp.bfloat16)
    assert gm._pick("auto", "gmm", xf, olmoe_down, 128, False) == "mgpu"  # K = 1024
    odd = sds((8, 4096, 14336 + 128), jnp.bfloat16)  # N not a multiple of the 256-wide tile
    assert gm._pick("auto", "gmm", xw, odd, 128, False) == "pallas"
    assert gm._pick("auto", "tgmm", x, dy, 128, True) == "pallas"  # interpret: Pallas only
    f32 = (x.astype(jnp.float32), dy.astype(jnp.float32))
    assert gm._pick("auto", "tgmm", *f32, 128, False) == "pallas"
    assert gm._pick("auto", "tgmm", x, dy[:, :200], 128, False) == "pallas"  # 200 % 128
    assert gm._pick("auto", "tgmm", x, dy, 64, False) == "pallas"  # blocks the tests skip
    assert gm._pick("pallas", "tgmm", x, dy, 128, False) == "pallas"  # a forced impl stays


def test_auto_gradient_lowers_to_the_kernels_whose_tiles_fit(monkeypatch):
    monkeypatch.setattr(gm, "_on_gpu", lambda: True)
    monkeypatch.setattr(mgpu_gmm, "on_hopper", lambda: True)
    cpu = jax.devices()
    monkeypatch.setattr(jax, "devices", lambda *a: [type("Gpu", (), {"core_count": 132})()]
                        if not a else cpu)  # fmt: skip
    block_tgmm, seen = mgpu_gmm.mgpu_block_gmm.tgmm, []
    monkeypatch.setattr(mgpu_gmm.mgpu_block_gmm, "tgmm",
                        lambda *a, **kw: seen.append(kw) or block_tgmm(*a, **kw))  # fmt: skip
    _, pos, src, layout, x, w = _case(n=512)
    fn = jax.jit(jax.value_and_grad(_loss("auto", layout, 128, src, pos), (0, 1)))
    text = fn.trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    # the weight gradient is modjax's block kernel, rounding to the weights' dtype itself
    assert [kw["out_dtype"] for kw in seen] == [w.dtype]
    # the weight gradient and the input gradient (dy [M, 512] @ w[g].T: K = 512, N = 256)
    # are Mosaic GPU kernels; the forward (K = 256 < GMM_MIN_K) is the Triton (Pallas)
    # kernel, which lowers to a "__gpu" custom call
    calls = re.findall(r"custom_call @(\w+)", text)
    kernels = sorted("mosaic" if c.startswith("mosaic_gpu") else c for c in calls)
    assert kernels == ["__gpu", "mosaic", "mosaic"], calls
    assert text.count("modjax_gmm") >= 1 and "modjax_tgmm" not in text


def test_tgmm_takes_the_block_kernel_where_it_fits(monkeypatch):
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu as jax_tgmm

    picked = []
    monkeypatch.setattr(mgpu_gmm.mgpu_block_gmm, "tgmm",
                        lambda *a, **kw: picked.append("block") or jnp.zeros(()))  # fmt: skip
    monkeypatch.setattr(jax_tgmm, "transposed_ragged_dot",
                        lambda *a, **kw: picked.append("ragged") or jnp.zeros(()))  # fmt: skip
    _, _, src, layout, x, _ = _case(k=256)
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0).astype(jnp.bfloat16)

    def pick(dy_width, **kw):
        mgpu_gmm.tgmm(xp, xp[:, :dy_width], layout, block_size=128, **kw)
        return picked.pop()

    assert pick(256) == "block"  # N = 256 fits the block kernel's 2 x 128 columns
    assert pick(128) == "ragged"  # N = 128 does not: jax's kernel
    assert pick(256, tiles={"block_n": 128}) == "ragged"  # jax's tiles: jax's kernel
    assert pick(256, kernel="ragged") == "ragged"
    monkeypatch.setattr(mgpu_gmm, "TGMM_KERNEL", "ragged")
    assert pick(256) == "ragged"
