"""Parameter merging: hand-computed TIES and DARE, SMEAR/averaging vs loops, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.aggregation import (
    dare,
    smear_merge,
    stack_trees,
    task_arithmetic,
    task_vector,
    ties_merge,
    trim_top_magnitude,
    weighted_average,
)


def _tree(seed):
    r = np.random.default_rng(seed)
    return {
        "w": r.normal(size=(3, 4)).astype(np.float32),
        "sub": (r.normal(size=(4,)).astype(np.float32), r.normal(size=(2, 2)).astype(np.float32)),
    }


def test_smear_merge_matches_loop_and_one_hot_selects():
    trees = [_tree(i) for i in range(3)]
    w = np.array([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]], np.float32)
    merged = jax.jit(smear_merge)(stack_trees(trees), w)
    for n in range(2):
        ref = jax.tree.map(lambda *xs, n=n: sum(w[n, e] * xs[e] for e in range(3)), *trees)
        got = jax.tree.map(lambda x, n=n: x[n], merged)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, ref)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[1], b), merged, trees[1])


def test_smear_merge_gradient_wrt_weights():
    trees = [_tree(i) for i in range(3)]
    stacked = stack_trees(trees)
    g = jax.grad(lambda w: sum(x.sum() for x in jax.tree.leaves(smear_merge(stacked, w))))(
        jnp.ones((1, 3))
    )
    ref = [sum(x.sum() for x in jax.tree.leaves(t)) for t in trees]
    np.testing.assert_allclose(g[0], ref, rtol=1e-5)


def test_weighted_average_uniform_and_given():
    trees = [_tree(i) for i in range(2)]
    avg = weighted_average(trees)
    np.testing.assert_allclose(avg["w"], (trees[0]["w"] + trees[1]["w"]) / 2, rtol=1e-6)
    out = weighted_average(trees, [0.25, 0.75])
    ref = 0.25 * trees[0]["sub"][1] + 0.75 * trees[1]["sub"][1]
    np.testing.assert_allclose(out["sub"][1], ref, rtol=1e-6)


def test_task_arithmetic_with_negation():
    base = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[0.5]])}
    ft1 = {"a": jnp.array([2.0, 2.0]), "b": jnp.array([[1.5]])}
    ft2 = {"a": jnp.array([1.0, 5.0]), "b": jnp.array([[0.0]])}
    t1, t2 = task_vector(ft1, base), task_vector(ft2, base)
    np.testing.assert_array_equal(t1["a"], [1.0, 0.0])
    out = task_arithmetic(base, [t1, t2], [1.0, -0.5])
    # a: [1,2] + [1,0] - 0.5*[0,3] = [2, 0.5];  b: 0.5 + 1 - 0.5*(-0.5) = 1.75
    np.testing.assert_allclose(out["a"], [2.0, 0.5])
    np.testing.assert_allclose(out["b"], [[1.75]])
    forget = task_arithmetic(base, [t1], -1.0)
    np.testing.assert_allclose(forget["a"], [0.0, 2.0])


def test_trim_top_magnitude_exact_count():
    x = jnp.array([0.1, -5.0, 3.0, -0.2, 0.0])
    np.testing.assert_array_equal(trim_top_magnitude(x, 0.4), [0, -5.0, 3.0, 0, 0])
    np.testing.assert_array_equal(trim_top_magnitude(x, 0.2), [0, -5.0, 0, 0, 0])  # 0.2*5 -> 1
    np.testing.assert_array_equal(trim_top_magnitude(x, 1.0), x)


def test_ties_merge_hand_computed():
    tvs = [
        {"v": jnp.array([3.0, -1.0, 0.5, -2.0]), "m": jnp.array([[1.0, 0.0]])},
        {"v": jnp.array([-1.0, -4.0, 2.0, 0.1]), "m": jnp.array([[-1.0, 0.0]])},
        {"v": jnp.array([2.0, 1.0, -3.0, 0.2]), "m": jnp.array([[0.0, 0.0]])},
    ]
    # density 0.5 keeps 2 of 4 in "v": [3,0,0,-2], [0,-4,2,0], [2,0,-3,0];
    # sum [5,-4,-1,-2] elects signs [+,-,-,-]; disjoint means: (3+2)/2, -4, -3 (2 disagrees), -2.
    # "m" keeps 1 of 2: [1,0], [-1,0], [0,0] (tie at 0 -> first); elected sign 0 -> 0.
    out = jax.jit(lambda t: ties_merge(t, density=0.5))(tvs)
    np.testing.assert_allclose(out["v"], [2.5, -4.0, -3.0, -2.0])
    np.testing.assert_array_equal(out["m"], [[0.0, 0.0]])


def _ties_numpy(tvs, density):
    t = np.stack(tvs).astype(np.float64)
    keep = max(1, int(np.ceil(density * t[0].size - 1e-9)))
    trimmed = np.zeros_like(t)
    for i in range(len(t)):
        idx = np.argsort(-np.abs(t[i].ravel()), kind="stable")[:keep]
        trimmed[i].flat[idx] = t[i].flat[idx]
    sign = np.sign(trimmed.sum(0))
    out = np.zeros_like(t[0])
    for j in np.ndindex(out.shape):
        vals = [trimmed[i][j] for i in range(len(t)) if trimmed[i][j] != 0]
        vals = [v for v in vals if np.sign(v) == sign[j]]
        out[j] = np.mean(vals) if vals else 0.0
    return out


def test_ties_merge_random_vs_numpy():
    r = np.random.default_rng(3)
    tvs = [r.normal(size=(5, 6)).astype(np.float32) for _ in range(4)]
    out = ties_merge(tvs, density=0.3, scales=[1.0, 0.5, 2.0, 1.0])
    scaled = [tvs[0], 0.5 * tvs[1], 2.0 * tvs[2], tvs[3]]
    np.testing.assert_allclose(out, _ties_numpy(scaled, 0.3), rtol=1e-5, atol=1e-6)


def test_dare_exact_rescaling():
    x = {"a": jnp.arange(1.0, 1001.0), "b": jnp.full((7, 3), -2.0)}
    key = jax.random.key(0)
    out = jax.jit(lambda x, k: dare(x, 0.75, k))(x, key)
    for got, ref in zip(jax.tree.leaves(out), jax.tree.leaves(x)):
        kept = got != 0
        np.testing.assert_allclose(got[kept], ref[kept] / 0.25, rtol=1e-6)
    assert 0.6 < 1 - np.mean(out["a"] != 0) < 0.9  # about 75% dropped
    np.testing.assert_array_equal(dare(x, 0.0, key)["a"], x["a"])
    again = dare(x, 0.75, key)
    np.testing.assert_array_equal(again["a"], out["a"])  # deterministic given the key


def test_dare_keeps_expectation():
    # Each entry of dare(1, p) is 1/(1-p) w.p. 1-p, else 0: mean 1, variance p/(1-p).
    # With p = 0.3 the std of one entry is sqrt(0.3/0.7) = 0.655, so the mean of n = 200_000
    # entries has std 0.655 / sqrt(n) = 0.00146; 0.0075 is ~5 sigma (false failure ~1e-6).
    n, p = 200_000, 0.3
    out = dare(jnp.ones((n,)), p, jax.random.key(42))
    assert abs(float(out.mean()) - 1.0) < 0.0075
    # the dropped fraction has std sqrt(0.3*0.7/n) = 0.001; 0.005 is 5 sigma
    assert abs(float(jnp.mean(out == 0)) - p) < 0.005


def test_merge_bad_input():
    a, b = {"w": jnp.ones(3)}, {"v": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"trees\[1\] has a different structure"):
        weighted_average([a, b])
    with pytest.raises(ValueError, match=r"trees\[1\]\['w'\] has shape \(4,\), trees\[0\] has"):
        weighted_average([a, {"w": jnp.ones(4)}])
    with pytest.raises(ValueError, match=r"weights must be \[E\] = \(2,\).*got shape \(3,\)"):
        weighted_average([a, a], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match=r"E = 2 .*got shape \(4, 3\)"):
        smear_merge(stack_trees([a, a]), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"scales must be .*\(2,\).*got shape \(3,\)"):
        task_arithmetic(a, [a, a], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="density must be a float in \\(0, 1\\], got 0"):
        ties_merge([a, a], density=0)
    with pytest.raises(ValueError, match="drop_rate must be a float in \\[0, 1\\), got 1.0"):
        dare(a, 1.0, jax.random.key(0))
    with pytest.raises(ValueError, match="must be a float array.*int32"):
        dare({"i": jnp.ones(3, jnp.int32)}, 0.5, jax.random.key(0))
    with pytest.raises(ValueError, match=r"\[finetuned, base\]\[1\] has a different structure"):
        task_vector(a, b)


def test_edge_cases_single_module_and_zero_weights():
    t = _tree(5)
    # one task vector kept whole: TIES returns it unchanged; one module: SMEAR scales it
    jax.tree.map(np.testing.assert_array_equal, ties_merge([t], density=1.0), t)
    half = smear_merge(stack_trees([t]), jnp.array([[0.5], [0.0]]))
    np.testing.assert_allclose(half["w"][0], 0.5 * t["w"], rtol=1e-6)
    np.testing.assert_array_equal(half["w"][1], 0.0)
    # NaN in a module's parameters propagates even through a zero weight (0 * NaN = NaN):
    # a broken module is never silently hidden by the merge
    bad = {"w": jnp.array([jnp.nan, 1.0])}
    out = smear_merge(stack_trees([bad, {"w": jnp.ones(2)}]), jnp.array([[0.0, 1.0]]))
    assert np.isnan(out["w"][0, 0]) and out["w"][0, 1] == 1.0
