import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.computation import adapter, hypernet, lora


def _generator(seed, z, h, m):
    rng = np.random.default_rng(seed)
    return {
        "hidden": rng.normal(size=(z, h)).astype(np.float32),
        "hidden_bias": rng.normal(size=(h,)).astype(np.float32),
        "out": rng.normal(size=(h, m)).astype(np.float32),
        "out_bias": rng.normal(size=(m,)).astype(np.float32),
    }


def test_generate_lora_vs_numpy_and_shapes():
    spec = hypernet.lora_spec(5, 3, 2)
    assert spec == {"a": (5, 2), "b": (2, 3)} and hypernet.param_count(spec) == 2 * (5 + 3)
    gen = _generator(0, 4, 6, 16)
    z = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)  # N = 3 tasks
    out = jax.jit(lambda z, g: hypernet.generate_params(z, g, spec))(z, gen)
    flat = np.maximum(z @ gen["hidden"] + gen["hidden_bias"], 0) @ gen["out"] + gen["out_bias"]
    assert out["a"].shape == (3, 5, 2) and out["b"].shape == (3, 2, 3)
    np.testing.assert_allclose(out["a"], flat[:, :10].reshape(3, 5, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["b"], flat[:, 10:].reshape(3, 2, 3), rtol=1e-5, atol=1e-5)


def test_generated_adapter_runs_and_gradient_reaches_embedding():
    spec = hypernet.adapter_spec(4, 2)
    m = hypernet.param_count(spec)
    assert m == 4 * 2 + 2 + 2 * 4 + 4
    gen = _generator(2, 3, 5, m)
    x = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)

    def loss(z):
        params = hypernet.generate_params(z, gen, spec, activation=jnp.tanh)
        return adapter.sequential_adapter(x, params, "tanh").sum()

    def np_loss(z):  # float64 twin, written out: generator, split in spec order, adapter
        g = {k: v.astype(np.float64) for k, v in gen.items()}
        flat = np.tanh(z @ g["hidden"] + g["hidden_bias"]) @ g["out"] + g["out_bias"]
        down, down_bias = flat[:8].reshape(4, 2), flat[8:10]
        up, up_bias = flat[10:18].reshape(2, 4), flat[18:]
        h = x.astype(np.float64)
        return (h + np.tanh(h @ down + down_bias) @ up + up_bias).sum()

    z = np.array([0.5, -1.0, 2.0])
    np.testing.assert_allclose(loss(jnp.asarray(z, jnp.float32)), np_loss(z), rtol=1e-5)
    g = jax.grad(loss)(jnp.asarray(z, jnp.float32))
    # central differences in float64 are accurate to ~1e-8, so the tolerance is float32's
    eps = 1e-5
    fd = [
        (np_loss(z + eps * np.eye(3)[i]) - np_loss(z - eps * np.eye(3)[i])) / (2 * eps)
        for i in range(3)
    ]
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-4)
    assert np.abs(g).sum() > 0


def test_task_layer_embedding_and_lora_use():
    t = jnp.ones((3, 2))
    z = hypernet.task_layer_embedding(t, jnp.array([7.0]))
    np.testing.assert_array_equal(z, [[1, 1, 7]] * 3)
    p = hypernet.unflatten_params(jnp.arange(16.0), hypernet.lora_spec(5, 3, 2))
    x = jnp.ones((1, 5))
    np.testing.assert_allclose(lora.lora_apply(x, p["a"], p["b"], 1.0), x @ p["a"] @ p["b"])


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        hypernet.lora_spec(4, 4, 0)
    with pytest.raises(ValueError, match="bottleneck_dim must be a positive int, got -2"):
        hypernet.adapter_spec(4, -2)
    with pytest.raises(ValueError, match="flat params have 7 entries, spec needs 16"):
        hypernet.unflatten_params(jnp.ones(7), hypernet.lora_spec(5, 3, 2))
    with pytest.raises(ValueError, match="generator must have keys"):
        hypernet.generate_params(jnp.ones(3), {"hidden": jnp.ones((3, 2))}, {"a": (1,)})
    with pytest.raises(ValueError, match="z width 2 does not match"):
        hypernet.generate_params(jnp.ones(2), _generator(0, 3, 5, 1), {"a": (1,)})
