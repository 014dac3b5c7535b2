"""weighted_sum and adapter_fusion against numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.aggregation import adapter_fusion, weighted_sum


def _rand(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_weighted_sum_matches_loop_under_jit():
    h, w = _rand(0, 2, 3, 4, 5), _rand(1, 2, 3, 4)  # [B, T, E, D], [B, T, E]
    ref = np.zeros((2, 3, 5), np.float32)
    for b in range(2):
        for t in range(3):
            for e in range(4):
                ref[b, t] += w[b, t, e] * h[b, t, e]
    out = jax.jit(weighted_sum)(h, w)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_weighted_sum_module_axis_first_and_fixed_weights():
    h = _rand(2, 4, 2, 3, 5)  # [E, B, T, D]
    w = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    ref = sum(w[e] * h[e] for e in range(4))
    np.testing.assert_allclose(weighted_sum(h, w, module_axis=0), ref, rtol=1e-5, atol=1e-6)


def test_weighted_sum_gradient():
    h, w = _rand(3, 3, 4, 2), _rand(4, 3, 4)
    gw = jax.grad(lambda w: weighted_sum(h, w).sum())(w)
    np.testing.assert_allclose(gw, h.sum(-1), rtol=1e-5)
    gh = jax.grad(lambda h: weighted_sum(h, w).sum())(h)
    np.testing.assert_allclose(gh, np.broadcast_to(w[..., None], h.shape), rtol=1e-6)


def test_weighted_sum_bad_input():
    h = jnp.ones((2, 3, 4))
    with pytest.raises(ValueError, match=r"weights must be \[..., E\] with E = 3.*\(2, 4\)"):
        weighted_sum(h, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="module_axis.*got 2"):
        weighted_sum(h, jnp.ones((2, 3)), module_axis=2)
    with pytest.raises(ValueError, match="do not broadcast"):
        weighted_sum(h, jnp.ones((5, 3)))


def _fusion_reference(q, k, v, temperature):
    scores = np.einsum("...d,...ed->...e", q, k) / temperature
    scores = scores - scores.max(-1, keepdims=True)
    a = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    return np.einsum("...e,...ed->...d", a, v), a


def test_adapter_fusion_matches_reference_and_weights_sum_to_one():
    q, k, v = _rand(5, 2, 3, 6), _rand(6, 2, 3, 4, 6), _rand(7, 2, 3, 4, 5)
    out = jax.jit(lambda q, k, v: adapter_fusion(q, k, v, temperature=2.0))(q, k, v)
    ref, a = _fusion_reference(q, k, v, 2.0)
    np.testing.assert_allclose(out.output, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.weights, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.weights.sum(-1), np.ones((2, 3)), rtol=1e-6)


def test_adapter_fusion_mask_and_gradient():
    q, k, v = _rand(8, 3, 4), _rand(9, 3, 3, 4), _rand(10, 3, 3, 2)
    mask = np.array([[True, False, True], [False, False, False], [False, True, False]])
    fused = jax.jit(lambda q: adapter_fusion(q, k, v, mask=mask))
    out = fused(q)
    ref0, a0 = _fusion_reference(q[0], k[0, [0, 2]], v[0, [0, 2]], 1.0)
    np.testing.assert_allclose(out.output[0], ref0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.weights[0], [a0[0], 0.0, a0[1]], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.weights[1], 0.0)  # no module allowed
    np.testing.assert_array_equal(out.output[1], 0.0)
    np.testing.assert_allclose(out.output[2], v[2, 1], rtol=1e-6)
    g = jax.jit(jax.grad(lambda q: fused(q).output.sum()))(q)
    assert np.all(np.isfinite(g)) and np.any(g[0] != 0)
    np.testing.assert_array_equal(g[1:], 0.0)  # fully masked, or a single module


def test_adapter_fusion_bad_input():
    q, k, v = jnp.ones((2, 4)), jnp.ones((2, 3, 4)), jnp.ones((2, 3, 5))
    with pytest.raises(ValueError, match=r"query must be .*got \(2, 5\)"):
        adapter_fusion(jnp.ones((2, 5)), k, v)
    with pytest.raises(ValueError, match=r"values must be .*got \(2, 2, 5\)"):
        adapter_fusion(q, k, jnp.ones((2, 2, 5)))
    with pytest.raises(ValueError, match="temperature.*got 0"):
        adapter_fusion(q, k, v, temperature=0)
