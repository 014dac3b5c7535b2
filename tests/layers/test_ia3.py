import jax
import numpy as np
import pytest
from flax import nnx

from modjax.layers.ia3 import IA3, IA3Scaled
from modjax.layers.params import IA3Param


def test_ia3_vs_numpy_and_identity_init():
    layer = IA3((2, 3))
    x = np.random.default_rng(0).normal(size=(4, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(layer(x), x)
    l = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    layer.scale[...] = l
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), x * l[None], rtol=1e-6)
    assert isinstance(layer.scale, IA3Param)


def test_scaled_linear_merge_is_exact():
    base = nnx.Linear(5, 4, bias_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
    layer = IA3Scaled(base)
    l = np.random.default_rng(2).normal(size=(4,)).astype(np.float32)
    layer.ia3.scale[...] = l
    x = np.random.default_rng(3).normal(size=(3, 5)).astype(np.float32)
    y = layer(x)
    np.testing.assert_allclose(y, np.asarray(base(x)) * l, rtol=1e-5, atol=1e-6)
    merged = layer.merge()
    np.testing.assert_allclose(merged(x), y, rtol=1e-5, atol=1e-5)


def test_gradient():
    layer = IA3(3)
    x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    g = nnx.grad(lambda m: m(x).sum())(layer)
    np.testing.assert_allclose(g["scale"][...], x.sum(0))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"features must be a positive int or shape, got \(0, 2\)"):
        IA3((0, 2))
    with pytest.raises(ValueError, match="trailing axes of x"):
        IA3(3)(jax.numpy.ones((2, 4)))


def test_scaled_einsum_scales_all_output_axes_and_merges():
    base = nnx.Einsum("btd,dhk->bthk", (4, 2, 3), (2, 3), rngs=nnx.Rngs(0))
    layer = IA3Scaled(base)
    assert layer.ia3.scale[...].shape == (2, 3)
    l = np.random.default_rng(4).normal(size=(2, 3)).astype(np.float32)
    layer.ia3.scale[...] = l
    x = np.random.default_rng(5).normal(size=(1, 2, 4)).astype(np.float32)
    y = layer(x)
    np.testing.assert_allclose(y, np.asarray(base(x)) * l, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.merge()(x), y, rtol=1e-5, atol=1e-5)
