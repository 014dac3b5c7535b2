import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modjax.layers.params import PromptParam
from modjax.layers.prompt import PrefixTuning, PromptedEmbed, PromptTuning


def _normal(seed, shape):
    # numpy: a jax.random draw compiles once per new shape
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_prompt_tuning_shapes_values_mask():
    layer = PromptTuning(3, 4, rngs=nnx.Rngs(0))
    x = _normal(1, (2, 5, 4))
    out = nnx.jit(lambda m, x: m(x))(layer, x)
    assert out.shape == (2, 8, 4)
    np.testing.assert_array_equal(out[:, :3], np.broadcast_to(layer.prompt[...], (2, 3, 4)))
    np.testing.assert_array_equal(out[:, 3:], x)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
    m = layer.extend_mask(mask)
    assert m.shape == (2, 8)
    np.testing.assert_array_equal(m[:, :3], True)
    np.testing.assert_array_equal(m[:, 3:], mask)
    assert isinstance(layer.prompt, PromptParam)


def test_prompted_embed_and_gradient():
    embed = PromptedEmbed(nnx.Embed(10, 4, rngs=nnx.Rngs(0)), PromptTuning(2, 4, rngs=nnx.Rngs(1)))
    tokens = jnp.array([[1, 2, 3]])
    out = embed(tokens)
    assert out.shape == (1, 5, 4)
    np.testing.assert_array_equal(out[0, 2:], embed.base.embedding[...][tokens[0]])
    g = nnx.grad(lambda m: m(tokens).sum(), argnums=nnx.DiffState(0, PromptParam))(embed)
    np.testing.assert_array_equal(g["prompt"]["prompt"][...], np.ones((2, 4)))
    assert embed.attend(jnp.ones((1, 4))).shape == (1, 10)


def test_prefix_tuning():
    layer = PrefixTuning(2, 3, 4, rngs=nnx.Rngs(0))
    k = jnp.ones((2, 5, 3, 4))
    res = layer(k, 2 * k, jnp.ones((2, 5), bool))
    assert res.keys.shape == res.values.shape == (2, 7, 3, 4) and res.mask.shape == (2, 7)
    np.testing.assert_array_equal(res.keys[1, :2], layer.prefix_keys[...])
    np.testing.assert_array_equal(res.values[0, 2:], 2 * k[0])
    assert layer.prefix_keys.get_metadata()["logical_axes"] == ("prompt", "heads", "head_dim")


def test_bad_inputs():
    with pytest.raises(ValueError, match="prompt_length must be a positive int, got 0"):
        PromptTuning(0, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="head_dim must be a positive int, got -1"):
        PrefixTuning(2, 3, -1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="prompt must be"):
        PromptTuning(2, 4, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 5)))
