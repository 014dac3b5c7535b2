import jax
import numpy as np
import pytest

from modjax.computation import adapter


def _params(seed, d=6, r=3):
    rng = np.random.default_rng(seed)
    return {
        "down": rng.normal(size=(d, r)).astype(np.float32),
        "down_bias": rng.normal(size=(r,)).astype(np.float32),
        "up": rng.normal(size=(r, d)).astype(np.float32),
        "up_bias": rng.normal(size=(d,)).astype(np.float32),
    }


def _np_bottleneck(x, p):
    h = np.maximum(x @ p["down"] + p["down_bias"], 0)
    return h @ p["up"] + p["up_bias"]


def test_sequential_vs_numpy_under_jit():
    p = _params(0)
    h = np.random.default_rng(1).normal(size=(2, 4, 6)).astype(np.float32)
    got = jax.jit(adapter.sequential_adapter, static_argnums=2)(h, p, "relu", 0.5)
    np.testing.assert_allclose(got, h + 0.5 * _np_bottleneck(h, p), rtol=1e-5, atol=1e-5)


def test_parallel_vs_numpy():
    p = _params(2)
    rng = np.random.default_rng(3)
    x, f = rng.normal(size=(5, 6)).astype(np.float32), rng.normal(size=(5, 6)).astype(np.float32)
    got = adapter.parallel_adapter(x, f, p, "relu", 2.0)
    np.testing.assert_allclose(got, f + 2.0 * _np_bottleneck(x, p), rtol=1e-5, atol=1e-5)


def test_activations_and_gradient():
    p = _params(4)
    x = np.random.default_rng(5).normal(size=(3, 6)).astype(np.float32)
    got = adapter.bottleneck(x, p, "tanh")
    want = np.tanh(x @ p["down"] + p["down_bias"]) @ p["up"] + p["up_bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda up: adapter.bottleneck(x, {**p, "up": up}, "identity").sum())(p["up"])
    np.testing.assert_allclose(g, (x @ p["down"] + p["down_bias"]).T @ np.ones((3, 6)), rtol=1e-5)


def test_zero_up_is_identity():
    p = _params(6)
    p["up"][:] = 0
    p["up_bias"][:] = 0
    x = np.random.default_rng(7).normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_array_equal(adapter.sequential_adapter(x, p), x)


def test_placements():
    assert adapter.PLACEMENTS["houlsby"] == ("attention", "ffn")
    assert adapter.PLACEMENTS["pfeiffer"] == ("ffn",)


def test_bad_inputs():
    p = _params(0)
    with pytest.raises(ValueError, match="activation must be one of .* got 'swish'"):
        adapter.bottleneck(np.ones((2, 6)), p, "swish")
    with pytest.raises(ValueError, match="x width 5 does not match adapter width D=6"):
        adapter.bottleneck(np.ones((2, 5)), p)
    with pytest.raises(ValueError, match="must have keys"):
        adapter.bottleneck(np.ones((2, 6)), {"down": p["down"]})
    with pytest.raises(ValueError, match="must have shapes"):
        adapter.bottleneck(np.ones((2, 6)), {**p, "up_bias": np.ones(5)})


def test_parallel_adapter_beside_width_changing_sublayer():
    rng = np.random.default_rng(8)
    p = {
        "down": rng.normal(size=(4, 2)).astype(np.float32),
        "down_bias": rng.normal(size=(2,)).astype(np.float32),
        "up": rng.normal(size=(2, 7)).astype(np.float32),
        "up_bias": rng.normal(size=(7,)).astype(np.float32),
    }
    x, f = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 7)).astype(np.float32)
    np.testing.assert_allclose(
        adapter.parallel_adapter(x, f, p), f + _np_bottleneck(x, p), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(
        ValueError, match="sequential adapter must keep the width, got D_in=4, D_out=7"
    ):
        adapter.sequential_adapter(x, p)
    with pytest.raises(ValueError, match="sublayer_out width 4 must equal adapter D_out=7"):
        adapter.parallel_adapter(x, x, p)
