import numpy as np
import pytest
from flax import nnx

from modjax.layers.adapter import Adapter, ParallelAdapter, SequentialAdapter
from modjax.layers.params import AdapterParam


def _normal(seed, shape):
    # numpy: a jax.random draw compiles once per new shape
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _randomize(ad, seed):
    for i, k in enumerate(("down", "down_bias", "up", "up_bias")):
        v = getattr(ad, k)
        v[...] = _normal(seed + i, v[...].shape)


def _np_branch(x, ad):
    p = {k: np.asarray(getattr(ad, k)[...]) for k in ("down", "down_bias", "up", "up_bias")}
    return np.maximum(x @ p["down"] + p["down_bias"], 0) @ p["up"] + p["up_bias"]


def test_adapter_starts_identity_then_matches_numpy():
    ad = Adapter(6, 3, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(ad(x), x)
    _randomize(ad, 1)
    np.testing.assert_allclose(
        nnx.jit(lambda m, x: m(x))(ad, x), x + _np_branch(x, ad), rtol=1e-5, atol=1e-5
    )
    assert all(isinstance(getattr(ad, k), AdapterParam) for k in ("down", "up"))
    assert ad.down.get_metadata()["logical_axes"] == ("embed", "rank")


def test_sequential_and_parallel_wrappers_vs_numpy():
    base = nnx.Linear(6, 6, rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).normal(size=(3, 6)).astype(np.float32)
    seq = SequentialAdapter(base, Adapter(6, 2, scale=0.5, rngs=nnx.Rngs(1)))
    _randomize(seq.adapter, 10)
    h = np.asarray(base(x))
    np.testing.assert_allclose(seq(x), h + 0.5 * _np_branch(h, seq.adapter), rtol=1e-5, atol=1e-5)
    par = ParallelAdapter(base, Adapter(6, 2, residual=False, rngs=nnx.Rngs(2)))
    _randomize(par.adapter, 20)
    np.testing.assert_allclose(par(x), h + _np_branch(x, par.adapter), rtol=1e-5, atol=1e-5)


def test_gradient_reaches_adapter():
    ad = Adapter(4, 2, rngs=nnx.Rngs(0))
    x = np.ones((2, 4), np.float32)
    g = nnx.grad(lambda m: (m(x) ** 2).sum())(ad)
    # up = 0: d/d up_bias of sum((x + up_bias)^2) = 2 * sum_rows x
    np.testing.assert_allclose(g["up_bias"][...], 2 * x.sum(0), rtol=1e-6)
    assert np.abs(g["up"][...]).sum() > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="bottleneck_dim must be a positive int, got 0"):
        Adapter(4, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="activation must be one of .* got 'nope'"):
        Adapter(4, 2, activation="nope", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x width 5 does not match adapter width D=4"):
        Adapter(4, 2, rngs=nnx.Rngs(0))(np.ones((1, 5), np.float32))
