"""Prompt concatenation (input aggregation) and stacking (function aggregation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.aggregation import concat_prompts, prepend_prompts, stack_apply


def test_concat_prompts_shared_shapes_and_order():
    p1, p2 = jnp.arange(6.0).reshape(2, 3), -jnp.arange(12.0).reshape(4, 3)
    out = concat_prompts([p1, p2])
    assert out.prompt.shape == (6, 3) and out.mask.shape == (6,)
    np.testing.assert_array_equal(out.prompt, np.concatenate([p1, p2]))
    np.testing.assert_array_equal(out.mask, np.ones(6, bool))


def test_concat_prompts_per_row_masks_and_batched_prompt():
    p1 = jnp.ones((2, 3))  # shared
    p2 = jnp.arange(2 * 1 * 3.0).reshape(2, 1, 3)  # per example, B = 2
    uses_p1 = jnp.array([[True], [False]])  # [B, 1] broadcast over P_1
    out = jax.jit(concat_prompts)([p1, p2], [uses_p1, None])
    assert out.prompt.shape == (2, 3, 3) and out.mask.shape == (2, 3)
    np.testing.assert_array_equal(out.mask, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(out.prompt[1, 2], p2[1, 0])
    np.testing.assert_array_equal(out.prompt[0, :2], p1)


def test_prepend_prompts_with_x_mask():
    x = jnp.full((2, 4, 3), 7.0, jnp.bfloat16)
    x_mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    y, mask = prepend_prompts(x, [jnp.ones((2, 3)), jnp.zeros((1, 3))], [None, [False]], x_mask)
    assert y.shape == (2, 7, 3) and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(mask, [[1, 1, 0, 1, 1, 1, 0], [1, 1, 0, 1, 1, 0, 0]])
    np.testing.assert_array_equal(y[:, 3:], x)
    np.testing.assert_array_equal(y[:, :2], 1.0)


def test_concat_prompts_bad_input():
    with pytest.raises(ValueError, match="prompts\\[1\\] has width 4"):
        concat_prompts([jnp.ones((2, 3)), jnp.ones((2, 4))])
    with pytest.raises(ValueError, match="one entry per prompt \\(2\\)"):
        concat_prompts([jnp.ones((2, 3)), jnp.ones((2, 3))], [None])
    with pytest.raises(ValueError, match=r"masks\[0\] must be .*P = 2, got shape \(3,\)"):
        concat_prompts([jnp.ones((2, 3))], [jnp.ones(3, bool)])
    with pytest.raises(ValueError, match="batch size 3, earlier ones 2"):
        concat_prompts([jnp.ones((2, 2, 3)), jnp.ones((3, 2, 3))])
    with pytest.raises(ValueError, match="x has D = 5"):
        prepend_prompts(jnp.ones((2, 4, 5)), [jnp.ones((2, 3))])


def test_stack_apply_order_matters_and_matches_manual():
    f = lambda x, s: x * s + 1.0
    g = lambda x, s: jnp.sin(x) - s
    x = jnp.linspace(-1.0, 1.0, 5)
    np.testing.assert_allclose(stack_apply([f, g], x, 2.0), g(f(x, 2.0), 2.0), rtol=1e-6)
    np.testing.assert_allclose(stack_apply([g, f], x, s=2.0), f(g(x, 2.0), 2.0), rtol=1e-6)
    assert not np.allclose(stack_apply([f, g], x, 2.0), stack_apply([g, f], x, 2.0))
    with pytest.raises(ValueError, match="non-empty sequence"):
        stack_apply([], x)
    with pytest.raises(ValueError, match=r"fns\[1\] must be callable, got int"):
        stack_apply([f, 3], x)
