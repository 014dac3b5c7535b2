import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modjax.computation.sparse import magnitude_mask
from modjax.layers.params import SparseDeltaParam, SparseIndices
from modjax.layers.sparse import SparseDelta


def _normal(seed, shape):
    # numpy: a jax.random draw compiles once per new shape
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_sparse_delta_vs_numpy_and_merge():
    base = nnx.Linear(5, 4, rngs=nnx.Rngs(0))
    mask = np.zeros((5, 4), bool)
    mask[0, 1] = mask[3, 2] = mask[4, 0] = True
    layer = SparseDelta(base, mask)
    assert layer.values[...].shape == (3,) and isinstance(layer.values, SparseDeltaParam)
    assert isinstance(layer.indices, SparseIndices)
    x = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    np.testing.assert_array_equal(layer(x), base(x))
    layer.values[...] = jnp.array([1.0, 2.0, 3.0])
    delta = np.zeros((5, 4), np.float32)
    delta[0, 1], delta[3, 2], delta[4, 0] = 1.0, 2.0, 3.0  # flat (row-major) order
    want = np.asarray(base(x)) + x @ delta
    y = nnx.jit(lambda m, x: m(x))(layer, x)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    kernel0 = np.asarray(base.kernel[...])
    merged = layer.merge()
    np.testing.assert_allclose(merged.kernel[...], kernel0 + delta, rtol=1e-6)
    np.testing.assert_allclose(merged(x), y, rtol=1e-5, atol=1e-5)


def test_gradient_only_on_kept_entries():
    base = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0))
    mask = np.asarray(magnitude_mask(base.kernel[...], 0.5))
    layer = SparseDelta(base, mask)
    x = jnp.array([[1.0, 2.0, 3.0]])
    g = nnx.grad(lambda m: m(x).sum(), argnums=nnx.DiffState(0, SparseDeltaParam))(layer)
    # d/d delta[i, j] of sum(x @ delta) = x[i]
    rows = np.flatnonzero(mask) // 2
    np.testing.assert_allclose(g["values"][...], np.asarray(x[0])[rows])


def test_einsum_base():
    base = nnx.Einsum("btd,dhk->bthk", (4, 2, 3), rngs=nnx.Rngs(0))
    layer = SparseDelta(base, np.ones((4, 2, 3), bool))
    layer.values[...] = _normal(1, (24,))
    x = _normal(2, (1, 3, 4))
    y = layer(x)
    np.testing.assert_allclose(layer.merge()(x), y, rtol=1e-5, atol=1e-5)


def test_bad_mask():
    base = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError,
        match=r"mask must be a boolean array of the kernel's shape \(3, 2\), got float64 \(3, 2\)",
    ):
        SparseDelta(base, np.ones((3, 2)))
