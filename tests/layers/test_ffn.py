"""Dense FeedForward layer: values vs numpy, gradients vs the pure function, tags, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modjax.computation import ffn as F
from modjax.layers.ffn import FeedForward


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_feedforward_matches_numpy(activation):
    layer = FeedForward(12, 20, activation=activation, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 12))
    xs = np.float64(x)
    if activation == "swiglu":
        g = xs @ np.float64(layer.wi_gate[...])
        h = g / (1 + np.exp(-g)) * (xs @ np.float64(layer.wi_up[...]))
    else:
        a = xs @ np.float64(layer.wi[...])
        h = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
    want = h @ np.float64(layer.wo[...])
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)


def test_feedforward_grads_and_tags():
    layer = FeedForward(8, 16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 8))
    g = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    p = layer.params_dict()
    gp = jax.grad(lambda p: jnp.sum(F.ffn(x, p) ** 2))(p)
    for n in p:
        np.testing.assert_allclose(g[n][...], gp[n], rtol=1e-5, atol=1e-6)
    assert layer.wi_gate.get_metadata()["logical_axes"] == ("embed", "mlp")
    assert layer.wo.get_metadata()["logical_axes"] == ("mlp", "embed")


def test_feedforward_dtypes():
    layer = FeedForward(8, 16, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert layer.wo[...].dtype == jnp.float32
    assert layer(jnp.ones((2, 8))).dtype == jnp.bfloat16


def test_feedforward_bad_input():
    with pytest.raises(ValueError, match="activation must be one of"):
        FeedForward(8, 16, activation="swish", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="d_ff must be a positive int, got 0"):
        FeedForward(8, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="param_dtype must be float32, bfloat16 or float16"):
        FeedForward(8, 16, param_dtype=jnp.int32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x width 9 does not match d_model=8"):
        FeedForward(8, 16, rngs=nnx.Rngs(0))(jnp.ones((2, 9)))
