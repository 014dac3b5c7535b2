import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.computation import prompt


def test_prepend_prompt_shapes_values_and_mask():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    p = rng.normal(size=(5, 4)).astype(np.float32)
    mask = np.array([[True, True, False], [True, False, False]])
    out, m = jax.jit(prompt.prepend_prompt)(x, p, mask)
    assert out.shape == (2, 8, 4) and m.shape == (2, 8)
    for b in range(2):
        np.testing.assert_array_equal(out[b, :5], p)
        np.testing.assert_array_equal(out[b, 5:], x[b])
    want = np.array([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(m, want)
    assert prompt.prepend_prompt(x, p)[1] is None


def test_per_example_prompt_and_dtype():
    x = jnp.zeros((2, 3, 4), jnp.bfloat16)
    p = jnp.arange(16.0).reshape(2, 2, 4)
    out, _ = prompt.prepend_prompt(x, p)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out[1, :2], p[1])


def test_prompt_gradient():
    x = jnp.ones((2, 3, 4))
    p = jnp.zeros((2, 4))
    g = jax.grad(
        lambda p: (prompt.prepend_prompt(x, p)[0] ** 2 + prompt.prepend_prompt(x, p)[0]).sum()
    )(p)
    np.testing.assert_array_equal(g, 2.0 * np.ones((2, 4)))  # each prompt row seen by B=2


def test_extend_mask_zero_length():
    m = np.array([[True, False]])
    np.testing.assert_array_equal(prompt.extend_mask(m, 0), m)


def test_prefix_kv_and_attention_vs_numpy():
    rng = np.random.default_rng(1)
    b, t, h, d, p = 2, 3, 2, 4, 2
    q, k, v = (rng.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(3))
    pk, pv = (rng.normal(size=(p, h, d)).astype(np.float32) for _ in range(2))
    mask = np.array([[True, True, True], [True, False, False]])
    res = prompt.prepend_prefix(k, v, pk, pv, mask)
    assert res.keys.shape == res.values.shape == (b, p + t, h, d)
    np.testing.assert_array_equal(res.keys[1, :p], pk)
    np.testing.assert_array_equal(res.values[0, p:], v[0])
    np.testing.assert_array_equal(res.mask[1], [True, True, True, False, False])
    got = jax.jit(prompt.attention_with_prefix)(q, k, v, pk, pv, mask)
    want = np.zeros_like(q)
    for bi in range(b):
        kk = np.concatenate([pk, k[bi]])
        vv = np.concatenate([pv, v[bi]])
        mm = np.concatenate([np.ones(p, bool), mask[bi]])
        for hi in range(h):
            for ti in range(t):
                logits = kk[:, hi] @ q[bi, ti, hi] / np.sqrt(d)
                logits = np.where(mm, logits, -np.inf)
                w = np.exp(logits - logits.max())
                w /= w.sum()
                want[bi, ti, hi] = w @ vv[:, hi]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda pk: prompt.attention_with_prefix(q, k, v, pk, pv, mask).sum())(pk)
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"x must be \[B, T, D\], got shape \(3, 4\)"):
        prompt.prepend_prompt(jnp.ones((3, 4)), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"prompt must be \[P, D\].*got \(2, 5\)"):
        prompt.prepend_prompt(jnp.ones((1, 3, 4)), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"mask must be \[B, T\]"):
        prompt.prepend_prompt(jnp.ones((1, 3, 4)), jnp.ones((2, 4)), jnp.ones((1, 2), bool))
    with pytest.raises(ValueError, match="prompt_length must be a non-negative int, got -1"):
        prompt.extend_mask(jnp.ones((1, 2), bool), -1)
    with pytest.raises(ValueError, match=r"prefix keys/values must be \[P, 2, 4\]"):
        prompt.prepend_prefix(
            jnp.ones((1, 3, 2, 4)), jnp.ones((1, 3, 2, 4)), jnp.ones((2, 3, 4)), jnp.ones((2, 3, 4))
        )
