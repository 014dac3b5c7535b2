import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modjax.layers.lora import LoRA, LoRALinear, kernel_in_dims
from modjax.layers.params import LoRAParam, ModuleParam


def _normal(seed, shape):
    # numpy: a jax.random draw compiles once per new shape
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


NORMAL = nnx.initializers.normal(1.0)


def test_starts_equal_to_base_and_adds_scaled_low_rank_path():
    base = nnx.Linear(6, 4, rngs=nnx.Rngs(0))
    x = _normal(1, (3, 6))
    want_base = base(x)
    layer = LoRA(base, rank=2, alpha=4.0, rngs=nnx.Rngs(2))
    np.testing.assert_array_equal(layer(x), want_base)  # B = 0
    layer.lora_b[...] = _normal(3, (2, 4))
    a, b = np.asarray(layer.lora_a[...]), np.asarray(layer.lora_b[...])
    want = np.asarray(want_base) + 2.0 * np.asarray(x) @ a @ b
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(layer, x), want, rtol=1e-5, atol=1e-5)
    assert isinstance(layer.lora_a, LoRAParam) and isinstance(layer.lora_a, ModuleParam)
    assert layer.lora_a.get_metadata()["logical_axes"] == (None, "rank")


def test_merged_equals_unmerged_and_unmerge_restores():
    layer = LoRALinear(8, 5, rank=3, alpha=6.0, b_init=NORMAL, rngs=nnx.Rngs(0))
    kernel0 = np.asarray(layer.base.kernel[...])
    x = _normal(1, (2, 7, 8))
    y = layer(x)
    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(layer(x), y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.base(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    np.testing.assert_allclose(layer.base.kernel[...], kernel0, atol=1e-6)
    np.testing.assert_allclose(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()


def test_einsum_base_merged_equals_unmerged():
    base = nnx.Einsum("btd,dhk->bthk", (8, 2, 3), (2, 3), rngs=nnx.Rngs(0))
    assert kernel_in_dims(base) == 1
    layer = LoRA(base, rank=2, b_init=NORMAL, rngs=nnx.Rngs(1))
    assert layer.lora_b[...].shape == (2, 6)
    x = _normal(2, (2, 5, 8))
    y = layer(x)
    delta = np.asarray(layer.lora_a[...] @ layer.lora_b[...]).reshape(8, 2, 3)
    want = np.asarray(base(x)) + np.einsum("btd,dhk->bthk", np.asarray(x), delta)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
    layer.merge()
    np.testing.assert_allclose(layer(x), y, rtol=1e-5, atol=1e-5)


def test_output_projection_einsum_two_contracted_axes():
    base = nnx.Einsum("bthk,hkd->btd", (2, 3, 8), rngs=nnx.Rngs(0))
    assert kernel_in_dims(base) == 2
    layer = LoRA(base, rank=2, b_init=NORMAL, rngs=nnx.Rngs(1))
    assert layer.lora_a[...].shape == (6, 2)
    x = _normal(2, (2, 4, 2, 3))
    y = layer(x)
    layer.merge()
    np.testing.assert_allclose(layer(x), y, rtol=1e-5, atol=1e-5)


def test_gradients_reach_factors_only_through_filter():
    layer = LoRALinear(4, 3, rank=2, rngs=nnx.Rngs(0))
    x = jnp.ones((2, 4))
    grads = nnx.grad(lambda m: m(x).sum(), argnums=nnx.DiffState(0, LoRAParam))(layer)
    # B = 0: dL/dA = 0, dL/dB = A^T x^T 1
    np.testing.assert_array_equal(grads["lora_a"][...], np.zeros((4, 2)))
    want = np.asarray(layer.lora_a[...]).T @ np.ones((4, 2)) @ np.ones((2, 3))
    np.testing.assert_allclose(grads["lora_b"][...], want, rtol=1e-5)
    assert "base" not in grads


def test_bad_inputs():
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        LoRALinear(4, 3, rank=0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="base must have a `kernel` Variable.*LayerNorm"):
        LoRA(nnx.LayerNorm(4, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="contracted kernel axes must come first"):
        LoRA(nnx.Einsum("btd,kd->btk", (3, 4), rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(0))
    layer = LoRALinear(4, 3, rank=2, rngs=nnx.Rngs(0))
    layer.merge()
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()
