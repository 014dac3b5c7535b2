import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.computation import lora


def _rand(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_lora_apply_matches_numpy_and_jit():
    x, a, b = _rand(0, 3, 5, 8), _rand(1, 8, 2), _rand(2, 2, 6)
    s = lora.lora_scaling(16.0, 2)
    assert s == 8.0
    want = s * np.einsum("btd,dr,rf->btf", x, a, b)
    got = jax.jit(lora.lora_apply, static_argnums=3)(x, a, b, s)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lora.lora_delta(a, b, s), s * a @ b, rtol=1e-6)


def test_merge_then_unmerge_roundtrip_and_merged_output():
    w, a, b, x = _rand(0, 8, 6), _rand(1, 8, 3), _rand(2, 3, 6), _rand(3, 4, 8)
    s = lora.lora_scaling(6.0, 3)
    merged = lora.merge_lora(w, a, b, s)
    np.testing.assert_allclose(
        x @ merged, x @ w + lora.lora_apply(x, a, b, s), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(lora.unmerge_lora(merged, a, b, s), w, atol=1e-5)


def test_merge_into_multi_axis_kernel():
    w, a, b = _rand(0, 8, 2, 3), _rand(1, 8, 4), _rand(2, 4, 6)
    got = lora.merge_lora(w, a, b, 0.5)
    np.testing.assert_allclose(got, w + 0.5 * (a @ b).reshape(8, 2, 3), rtol=1e-5, atol=1e-6)
    assert got.dtype == jnp.float32
    assert lora.merge_lora(w.astype(jnp.bfloat16), a, b, 0.5).dtype == jnp.bfloat16


def test_gradients():
    x, a, b = _rand(0, 4, 8), _rand(1, 8, 2), _rand(2, 2, 5)
    ga, gb = jax.grad(lambda a, b: lora.lora_apply(x, a, b, 2.0).sum(), argnums=(0, 1))(a, b)
    # d/dA sum(s x A B) = s x^T 1 B^T ; d/dB = s A^T x^T 1
    ones = np.ones((4, 5), np.float32)
    np.testing.assert_allclose(ga, 2.0 * x.T @ ones @ b.T, rtol=1e-5)
    np.testing.assert_allclose(gb, 2.0 * a.T @ x.T @ ones, rtol=1e-5)


def test_zero_b_is_identity():
    w, a, x = _rand(0, 8, 6), _rand(1, 8, 2), _rand(2, 3, 8)
    b = np.zeros((2, 6), np.float32)
    np.testing.assert_array_equal(lora.lora_apply(x, a, b, 1.0), np.zeros((3, 6)))
    np.testing.assert_array_equal(lora.merge_lora(w, a, b, 1.0), w)


@pytest.mark.parametrize("rank", [0, -1, 2.0, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match=f"rank must be a positive int, got {rank!r}"):
        lora.lora_scaling(8.0, rank)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"a \[D, R\] and b \[R, F\].*\(8, 2\).*\(3, 6\)"):
        lora.lora_delta(np.ones((8, 2)), np.ones((3, 6)), 1.0)
    with pytest.raises(ValueError, match="x width 7"):
        lora.lora_apply(np.ones((2, 7)), np.ones((8, 2)), np.ones((2, 6)), 1.0)
    with pytest.raises(ValueError, match="does not fit weight w"):
        lora.merge_lora(np.ones((8, 5)), np.ones((8, 2)), np.ones((2, 6)), 1.0)
