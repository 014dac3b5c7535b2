import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.computation import ia3


def test_ia3_scale_vs_numpy_jit_and_grad():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)
    l = rng.normal(size=(3, 4)).astype(np.float32)
    got = jax.jit(ia3.ia3_scale)(x, l)
    want = np.empty_like(x)
    for i in np.ndindex(x.shape):
        want[i] = x[i] * l[i[2], i[3]]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    g = jax.grad(lambda l: ia3.ia3_scale(x, l).sum())(l)
    np.testing.assert_allclose(g, x.sum(axis=(0, 1)), rtol=1e-5)


def test_ones_is_identity_and_dtype_kept():
    x = jnp.arange(12.0, dtype=jnp.bfloat16).reshape(3, 4)
    out = ia3.ia3_scale(x, jnp.ones((4,)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, x)


def test_merge_ia3_equals_scaled_output():
    rng = np.random.default_rng(1)
    w, x, l = (rng.normal(size=s).astype(np.float32) for s in ((6, 5), (3, 6), (5,)))
    np.testing.assert_allclose(x @ ia3.merge_ia3(w, l), (x @ w) * l, rtol=1e-5, atol=1e-6)


def test_bad_shape():
    with pytest.raises(
        ValueError, match=r"ia3 scale \(5,\) must match the trailing axes of x \(2, 4\)"
    ):
        ia3.ia3_scale(jnp.ones((2, 4)), jnp.ones((5,)))
    with pytest.raises(ValueError, match="output axes of w"):
        ia3.merge_ia3(jnp.ones((2, 4)), jnp.ones((5,)))
