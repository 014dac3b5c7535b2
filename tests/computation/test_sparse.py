import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.computation import sparse


def test_magnitude_mask_hand_made():
    x = jnp.array([[0.1, -5.0, 0.3], [2.0, -0.2, 1.0]])
    np.testing.assert_array_equal(
        sparse.magnitude_mask(x, 0.5), [[False, True, False], [True, False, True]]
    )
    np.testing.assert_array_equal(
        sparse.magnitude_mask(x, 1 / 6), [[False, True, False], [False] * 3]
    )
    assert not sparse.magnitude_mask(x, 0.0).any()
    assert sparse.magnitude_mask(x, 1.0).all()


def test_saliency_mask_hand_made_differs_from_magnitude():
    w = jnp.array([10.0, 1.0, -2.0, 0.5])
    g = jnp.array([0.01, 3.0, -1.0, 0.0])  # |w g| = [0.1, 3, 2, 0]
    np.testing.assert_array_equal(sparse.saliency_mask(w, g, 0.5), [False, True, True, False])
    np.testing.assert_array_equal(sparse.magnitude_mask(w, 0.5), [True, False, True, False])


def test_ties_broken_towards_lower_index_and_nan_never_kept():
    np.testing.assert_array_equal(sparse.top_k_mask(jnp.ones(4), 0.5), [True, True, False, False])
    s = jnp.array([jnp.nan, 1.0, 2.0])
    np.testing.assert_array_equal(sparse.top_k_mask(s, 2 / 3), [False, True, True])


def test_mask_vs_numpy_random_under_jit():
    x = np.random.default_rng(0).normal(size=(7, 9)).astype(np.float32)
    m = jax.jit(sparse.magnitude_mask, static_argnums=1)(x, 0.3)
    k = round(0.3 * 63)
    assert int(m.sum()) == k == sparse.num_kept(63, 0.3)
    thresh = np.sort(np.abs(x).ravel())[::-1][k - 1]
    np.testing.assert_array_equal(m, np.abs(x) >= thresh)


def test_apply_sparse_delta_value_and_gradient():
    w = jnp.ones((2, 3))
    delta = jnp.arange(6.0).reshape(2, 3)
    mask = jnp.array([[True, False, False], [False, False, True]])
    np.testing.assert_array_equal(sparse.apply_sparse_delta(w, delta, mask), [[1, 1, 1], [1, 1, 6]])
    g = jax.grad(lambda d: sparse.apply_sparse_delta(w, d, mask).sum())(delta)
    np.testing.assert_array_equal(g, mask.astype(jnp.float32))


@pytest.mark.parametrize("density", [-0.1, 1.5, "0.5", True])
def test_bad_density(density):
    with pytest.raises(ValueError, match=f"density must be a float in \\[0, 1\\], got {density!r}"):
        sparse.top_k_mask(jnp.ones(3), density)


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"grad shape \(2,\) must equal w shape \(3,\)"):
        sparse.saliency_mask(jnp.ones(3), jnp.ones(2), 0.5)
    with pytest.raises(ValueError, match="one shape"):
        sparse.apply_sparse_delta(jnp.ones(3), jnp.ones(3), jnp.ones(2, bool))
