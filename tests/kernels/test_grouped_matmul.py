"""Grouped matmul kernels vs a per-row numpy reference: values and gradients.

Set ``MODJAX_GPU_TESTS=1`` on a GPU machine to also run the compiled Pallas kernels
(bf16 inputs, bf16 tolerances) instead of only interpret mode.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.kernels import grouped_matmul as gm

GPU = os.environ.get("MODJAX_GPU_TESTS") == "1"
# Interpret mode runs the Pallas kernels' Python on CPU; compiled Triton needs a GPU.
INTERPRET = not GPU
IMPLS = ["reference", "xla", "pallas"]


def _ids(rng, m, g, kind):
    if kind == "random":
        return rng.integers(0, g, m)
    if kind == "skewed":  # 80% of rows to groups 0 and 1
        ids = rng.integers(0, g, m)
        hot = rng.random(m) < 0.8
        return np.where(hot, rng.integers(0, 2, m), ids)
    if kind == "empty":  # groups 1 and g-1 get nothing
        ids = rng.integers(0, g, m)
        return np.where((ids == 1) | (ids == g - 1), 0, ids)
    if kind == "one":
        return np.full(m, g // 2)
    raise AssertionError(kind)


def _setup(seed, m, k, n, g, bs, kind, dtype=jnp.float32, transpose=False):
    rng = np.random.default_rng(seed)
    ids = _ids(rng, m, g, kind)
    pos, src, layout = gm.sort_to_blocks(jnp.asarray(ids), g, bs)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.normal(size=(g, n, k) if transpose else (g, k, n)).astype(np.float32)
    return ids, pos, src, layout, jnp.asarray(x, dtype), jnp.asarray(w, dtype)


# On GPU, float32 dots run in TF32 (XLA's and Triton's default): ~1e-3 relative error.
F32_TOL = dict(rtol=5e-3, atol=5e-3) if GPU else dict(rtol=1e-4, atol=1e-4)


def _tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else F32_TOL


@pytest.mark.parametrize("ranks", ["sort", "count"])
def test_sort_to_blocks_layout(ranks):
    rng = np.random.default_rng(0)
    m, g, bs = 61, 7, 8
    ids = _ids(rng, m, g, "empty")
    pos, src, layout = gm.sort_to_blocks(jnp.asarray(ids), g, bs, ranks=ranks)
    pos, src = np.asarray(pos), np.asarray(src)
    bg, gs = np.asarray(layout.block_group), np.asarray(layout.group_start)
    assert len(set(pos.tolist())) == m
    np.testing.assert_array_equal(src[pos], np.arange(m))
    assert (src[np.setdiff1d(np.arange(len(src)), pos)] == m).all()
    # Every row sits in a block of its own group; groups are contiguous and in order.
    np.testing.assert_array_equal(bg[pos // bs], ids)
    counts = np.bincount(ids, minlength=g)
    np.testing.assert_array_equal(np.diff(gs), -(-counts // bs))
    # Stable: rows keep their order inside each group.
    for e in range(g):
        assert (np.diff(pos[ids == e]) > 0).all()


@pytest.mark.parametrize("kind", ["random", "skewed", "empty", "one"])
def test_sort_to_blocks_ranks_by_count_equal_ranks_by_sort(kind):
    # the two ways of ranking rows in their group give the same layout, invalid rows too
    rng = np.random.default_rng(5)
    m, g, bs = 300, 9, 16
    ids = jnp.asarray(_ids(rng, m, g, kind))
    valid = jnp.asarray(rng.random(m) < 0.85)
    for v in (None, valid):
        got = jax.jit(functools.partial(gm.sort_to_blocks, ranks="count"), static_argnums=(1, 2))(
            ids, g, bs, v
        )
        want = gm.sort_to_blocks(ids, g, bs, v, ranks="sort")
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # no rows at all: an empty layout either way
    empty = [
        gm.sort_to_blocks(jnp.zeros((0,), jnp.int32), g, bs, ranks=r) for r in ("sort", "count")
    ]
    for a, b in zip(*(jax.tree.leaves(e) for e in empty)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="ranks must be 'sort', 'count' or 'auto', got 'radix'"):
        gm.sort_to_blocks(ids, g, bs, ranks="radix")


def test_layout_ranks_auto_counts_on_a_gpu_and_sorts_elsewhere(monkeypatch):
    assert gm.LAYOUT_RANKS == "auto"
    monkeypatch.setattr(gm, "_on_gpu", lambda: False)  # e.g. this CPU
    assert gm._layout_ranks(None) == "sort"
    monkeypatch.setattr(gm, "_on_gpu", lambda: True)
    assert gm._layout_ranks(None) == "count" and gm._layout_ranks("sort") == "sort"


def test_layout_has_no_while_loop():
    # on a GPU a while loop's every step is tiny kernels and control (~0.07 ms a call
    # at the small H200 shape): the layout (block groups by compare-all) is loop-free
    ids = jnp.zeros((1000,), jnp.int32)
    for fn in (
        lambda i: gm.sort_to_blocks(i, 64, 128),
        lambda i: gm.sort_to_blocks(i, 64, 128, ranks="count"),
        lambda i: gm.group_layout(jnp.bincount(i, length=64), 1000, 128),
    ):
        jaxpr = str(jax.make_jaxpr(fn)(ids))
        assert "while" not in jaxpr
    layout = gm.group_layout(jnp.asarray([3, 0, 9, 1]), 13, 2)  # blocks 2, 0, 5, 1
    np.testing.assert_array_equal(layout.block_group, [0, 0, 2, 2, 2, 2, 2, 3])
    np.testing.assert_array_equal(layout.group_start, [0, 2, 2, 7, 8])


@pytest.mark.parametrize("kind", ["random", "skewed", "empty", "one"])
@pytest.mark.parametrize("packed", [True, False])
def test_stable_sort_by_group_is_stable_argsort(kind, packed):
    # the packed-key sort and its argsort fallback (keys too wide for int32) both equal
    # numpy's stable argsort
    rng = np.random.default_rng(3)
    m, g = 997, 9
    ids = _ids(rng, m, g, kind)
    num_keys = g + 1 if packed else np.iinfo(np.int32).max // m + 1
    order, sorted_ids = jax.jit(gm._stable_sort_by_group, static_argnums=1)(
        jnp.asarray(ids, jnp.int32), num_keys
    )
    want = np.argsort(ids, kind="stable")
    np.testing.assert_array_equal(np.asarray(order), want)
    np.testing.assert_array_equal(np.asarray(sorted_ids), ids[want])


@pytest.mark.parametrize("ranks", ["sort", "count"])
def test_sort_to_blocks_skips_invalid_rows(ranks):
    # invalid rows (padding, dropped assignments) take no place in any block
    rng = np.random.default_rng(1)
    m, g, bs = 53, 5, 8
    ids = _ids(rng, m, g, "random")
    valid = rng.random(m) < 0.6
    pos, src, layout = gm.sort_to_blocks(jnp.asarray(ids), g, bs, jnp.asarray(valid), ranks=ranks)
    want_pos, want_src, want_layout = gm.sort_to_blocks(jnp.asarray(ids[valid]), g, bs)
    pos, src = np.asarray(pos), np.asarray(src)
    np.testing.assert_array_equal(np.asarray(layout.group_start), want_layout.group_start)
    np.testing.assert_array_equal(pos[valid], want_pos)  # the valid rows' own layout
    assert (pos[~valid] == 0).all()
    kept_rows = np.flatnonzero(valid)  # src names original rows (m for padding)
    want = np.where(
        np.asarray(want_src) < valid.sum(), kept_rows[np.minimum(want_src, valid.sum() - 1)], m
    )
    np.testing.assert_array_equal(src[: len(want)], want)
    assert (src[len(want) :] == m).all()


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_block_moves_match_plain_take_values_and_grads(k):
    # to_blocks / from_blocks (gather-only gradients) against plain jnp.take
    rng = np.random.default_rng(10 + k)
    t, d, g, bs = 29, 6, 5, 8
    ids = jnp.asarray(_ids(rng, t * k, g, "random"))
    valid = jnp.asarray(rng.random(t * k) < 0.75)  # dropped assignments place no row
    pos, src, _ = gm.sort_to_blocks(ids, g, bs, valid)
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    scale = jnp.asarray(rng.normal(size=(src.shape[0], d)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(t * k, d)), jnp.float32)

    def loss(to, back):
        def f(x, scale):
            xp = to(x, src, pos, valid, k)
            return jnp.sum(jnp.cos(back(xp * scale + jnp.sin(xp), pos, src, valid)) * probe)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    got = loss(gm.to_blocks, gm.from_blocks)(x, scale)
    want = loss(gm.to_blocks_reference, gm.from_blocks_reference)(x, scale)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # no scatter in the gradient program
    hlo = jax.jit(jax.grad(lambda x: jnp.sum(gm.to_blocks(x, src, pos, valid, k) ** 2)))
    assert "scatter" not in hlo.lower(x).as_text()
    with pytest.raises(ValueError, match=r"must be \[T\*k\]"):
        gm.to_blocks(x[:-1], src, pos, valid, k)


@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_combine_from_blocks_matches_reference_values_and_grads(k, kind, dtype):
    # the fused combine (its gradient gathers each padded row from its token's) against
    # from_blocks + the weighted sum, for the rows and the weights
    rng = np.random.default_rng(20 + k)
    t, d, g, bs = 37, 10, 6, 8
    ids = jnp.asarray(_ids(rng, t * k, g, kind))
    valid = jnp.asarray(rng.random(t * k) < 0.8)
    pos, src, _ = gm.sort_to_blocks(ids, g, bs, valid)
    yp = jnp.asarray(rng.normal(size=(src.shape[0], d)), dtype)
    weight = jnp.asarray(rng.random(size=(t, k)), jnp.float32)
    probe = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)

    def loss(combine):
        def f(yp, weight):
            y = combine(jnp.tanh(yp) * 2, weight * 1.5, pos, src, valid, dtype)
            assert y.shape == (t, d) and y.dtype == dtype
            return jnp.sum(jnp.sin(y.astype(jnp.float32)) * probe)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))

    got = loss(gm.combine_from_blocks)(yp, weight)
    want = loss(gm.combine_from_blocks_reference)(yp, weight)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=tol, atol=tol)  # fmt: skip
    assert float(jnp.abs(got[1][0]).sum()) > 0 and float(jnp.abs(got[1][1]).sum()) > 0
    # padding rows and dropped assignments get no gradient
    dyp, dw = got[1]
    assert (np.asarray(dyp, np.float32)[np.asarray(src) >= t * k] == 0).all()
    assert (np.asarray(dw)[~np.asarray(valid).reshape(t, k)] == 0).all()
    with pytest.raises(ValueError, match=r"must be \[T\*k\]"):
        gm.combine_from_blocks(yp, weight[:-1], pos, src, valid)
    with pytest.raises(ValueError, match=r"source .* must be \[P\]"):
        gm.combine_from_blocks(yp[:-1], weight, pos, src, valid)


def test_permute_rows_values_grads_and_no_scatter():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(23, 4)), jnp.float32)
    perm = jnp.asarray(rng.permutation(23), jnp.int32)
    probe = jnp.asarray(rng.normal(size=(23, 4)), jnp.float32)
    f = lambda permute: jax.value_and_grad(lambda x: jnp.sum(jnp.sin(permute(x)) * probe))
    got = jax.jit(f(lambda x: gm.permute_rows(x, perm)))(x)
    want = f(lambda x: x[perm])(x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    inverse = jnp.argsort(perm).astype(jnp.int32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(gm.permute_rows(x, perm, inverse) ** 2)))
    assert "scatter" not in grad.lower(x).as_text()
    with pytest.raises(ValueError, match="perm must be a permutation of x's 23 rows"):
        gm.permute_rows(x, perm[:-1])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["random", "skewed", "empty", "one"])
@pytest.mark.parametrize("transpose", [False, True])
def test_gmm_values_and_grads(impl, kind, transpose):
    # Sizes that are multiples of no block or tile size.
    m, k, n, g, bs = 53, 40, 24, 5, 16
    dtype = jnp.bfloat16 if GPU else jnp.float32
    ids, pos, src, layout, x, w = _setup(1, m, k, n, g, bs, kind, dtype, transpose)

    def fast(x, w):
        xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
        kw = dict(block_size=bs, transpose_rhs=transpose, impl=impl, interpret=INTERPRET)
        return gm.gmm(xp, w, layout, **kw)[pos]

    def ref(x, w):
        wr = jnp.swapaxes(w, 1, 2) if transpose else w
        x32, w32 = x.astype(jnp.float32), wr.astype(jnp.float32)
        return jnp.einsum("mk,mkn->mn", x32, w32[ids], precision="highest")

    out = jax.jit(fast)(x, w)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.float32(out), ref(x, w), **_tol(dtype))
    ct = jnp.asarray(np.random.default_rng(2).normal(size=out.shape), jnp.float32)
    gf = jax.grad(lambda x, w: jnp.sum(fast(x, w).astype(jnp.float32) * ct), (0, 1))(x, w)
    gr = jax.grad(lambda x, w: jnp.sum(ref(x, w) * ct), (0, 1))(x, w)
    for a, b in zip(gf, gr):
        assert a.dtype == dtype
        scale = float(jnp.abs(b).max())
        np.testing.assert_allclose(np.float32(a) / scale, np.float32(b) / scale, **_tol(dtype))


@pytest.mark.parametrize("impl", IMPLS)
def test_gmm_unused_blocks_are_zero(impl):
    ids, pos, src, layout, x, w = _setup(3, 20, 16, 16, 6, 16, "one")
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0) + 1.0  # padding rows nonzero
    out = gm.gmm(xp, w, layout, block_size=16, impl=impl, interpret=True)
    used = int(layout.group_start[-1]) * 16
    assert used < out.shape[0]
    assert (np.asarray(out[used:]) == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_tgmm_matches_reference_with_empty_groups(impl):
    m, k, n, g, bs = 45, 24, 40, 6, 16
    ids, pos, src, layout, x, _ = _setup(4, m, k, n, g, bs, "empty")
    dy = jnp.asarray(np.random.default_rng(5).normal(size=(m, n)), jnp.float32)
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
    dyp = jnp.take(dy, src, axis=0, mode="fill", fill_value=0)
    out = gm.tgmm(xp, dyp, layout, block_size=bs, impl=impl, interpret=True)
    ref = np.zeros((g, k, n), np.float32)
    for i in range(m):
        ref[ids[i]] += np.outer(np.asarray(x[i]), np.asarray(dy[i]))
    np.testing.assert_allclose(out, ref, **F32_TOL)
    assert (np.asarray(out[1]) == 0).all() and (np.asarray(out[g - 1]) == 0).all()


@pytest.mark.skipif(not GPU, reason="compiled Pallas kernels need a GPU (MODJAX_GPU_TESTS=1)")
@pytest.mark.parametrize("kind", ["random", "skewed"])
def test_pallas_compiled_bf16_large(kind):
    m, k, n, g, bs = 4000, 512, 768, 8, 128
    ids, pos, src, layout, x, w = _setup(6, m, k, n, g, bs, kind, jnp.bfloat16)
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
    fast = jax.jit(lambda x, w: gm.gmm(x, w, layout, block_size=bs, impl="pallas"))
    ref = jax.jit(lambda x, w: gm.gmm(x, w, layout, block_size=bs, impl="reference"))
    a, b = np.float32(fast(xp, w)), np.float32(ref(xp, w))
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-2
    ta = gm.tgmm(xp, xp, layout, block_size=bs, impl="pallas")
    tb = gm.tgmm(xp, xp, layout, block_size=bs, impl="reference")
    assert np.linalg.norm(ta - tb) / np.linalg.norm(tb) < 1e-2


def test_bad_inputs_raise():
    ids, pos, src, layout, x, w = _setup(7, 20, 16, 8, 4, 16, "random")
    xp = jnp.take(x, src, axis=0, mode="fill", fill_value=0)
    with pytest.raises(ValueError, match="x width 16 does not match"):
        gm.gmm(xp, jnp.zeros((4, 12, 8)), layout, block_size=16)
    with pytest.raises(ValueError, match="impl must be one of"):
        gm.gmm(xp, w, layout, block_size=16, impl="cuda")
    with pytest.raises(ValueError, match="x dtype must be one of"):
        gm.gmm(xp.astype(jnp.int32), w, layout, block_size=16)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        gm.gmm(xp, w, layout, block_size=0)
    with pytest.raises(ValueError, match="w has 3 groups"):
        gm.gmm(xp, w[:3], layout, block_size=16)
    with pytest.raises(ValueError, match="rows; block-padded layout needs"):
        gm.gmm(xp[:-1], w, layout, block_size=16)
    pos24, src24, layout24 = gm.sort_to_blocks(jnp.zeros((20,), jnp.int32), 4, 24)
    xp24 = jnp.zeros((layout24.num_blocks * 24, 16))
    with pytest.raises(ValueError, match="power of two >= 16 for the Pallas kernels, got 24"):
        gm.gmm(xp24, w, layout24, block_size=24, impl="pallas", interpret=True)
