import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modjax.computation import hypernet as hyper_lib
from modjax.layers.hypernet import HyperLoRA, HyperNetwork
from modjax.layers.params import HyperParam


def _normal(seed, shape):
    # numpy: a jax.random draw compiles once per new shape
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_hyper_lora_matches_generated_lora_per_example():
    base = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    layer = HyperLoRA(base, rank=2, num_tasks=3, task_dim=5, alpha=4.0, rngs=nnx.Rngs(1))
    x = _normal(2, (3, 7, 6))
    task = jnp.array([2, 0, 2])
    y = nnx.jit(lambda m, x, t: m(x, task=t))(layer, x, task)
    for b in range(3):
        f = layer.factors(int(task[b]))
        want = base(x[b]) + 2.0 * (x[b] @ f["a"]) @ f["b"]
        np.testing.assert_allclose(y[b], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer(x[1]), y[1], rtol=1e-4, atol=1e-5)  # default task 0
    assert not np.allclose(y[0], y[1])  # tasks differ


def test_gradients_reach_task_embedding_of_used_tasks_only():
    layer = HyperLoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), 2, num_tasks=3, rngs=nnx.Rngs(1))
    x = _normal(0, (2, 4))
    g = nnx.grad(
        lambda m: (m(x, task=jnp.array([1, 1])) ** 2).sum(), argnums=nnx.DiffState(0, HyperParam)
    )(layer)
    ge = np.asarray(g["task_embedding"][...])
    assert np.abs(ge[1]).sum() > 0
    np.testing.assert_array_equal(ge[[0, 2]], 0.0)
    assert np.abs(g["generator"]["out"][...]).sum() > 0
    assert "base" not in g


def test_hypernetwork_generates_adapter_spec():
    spec = hyper_lib.adapter_spec(4, 2)
    net = HyperNetwork(3, spec, hidden_dim=5, rngs=nnx.Rngs(0))
    out = net(jnp.ones((2, 3)))
    assert {k: v.shape for k, v in out.items()} == {
        "down": (2, 4, 2), "down_bias": (2, 2), "up": (2, 2, 4), "up_bias": (2, 4)
    }  # fmt: skip


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        HyperLoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), 0, num_tasks=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_tasks must be a positive int, got 0"):
        HyperLoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), 2, num_tasks=0, rngs=nnx.Rngs(0))
    layer = HyperLoRA(nnx.Linear(4, 3, rngs=nnx.Rngs(0)), 2, num_tasks=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="task must be an int or an int array"):
        layer(jnp.ones((2, 4)), task=jnp.array([0.5, 1.0]))
