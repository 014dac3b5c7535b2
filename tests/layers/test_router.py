import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modjax.layers.router import STRATEGIES, Router, RouterBias, RouterParam, SkillAllocator
from modjax.routing.top_k import top_k_routing


def rnd(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


X = rnd(0, (2, 8, 16))
IDS = jnp.arange(16).reshape(2, 8)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_shapes_and_outputs(strategy):
    k = 1 if strategy in ("soft", "soft_moe", "expert_choice") else 2
    jitter = 0.0 if strategy in ("hash", "task") else 0.1
    router = Router(16, 4, k=k, strategy=strategy, num_slots=2, jitter=jitter, rngs=nnx.Rngs(0))
    out = router(X, train=True, token_ids=IDS, task_ids=jnp.array([1, 3]))
    assert out.routing.probs.shape == (2, 8, 4)
    assert 0.99 < float(out.metrics["load_fraction"].sum()) < 1.01
    for v in out.aux_losses.values():
        assert v.shape == () and np.isfinite(float(v))
    if strategy not in ("hash", "task"):
        assert set(out.aux_losses) >= {"z_loss"}


def test_matches_pure_top_k_in_float32_with_bf16_input():
    router = Router(16, 4, k=2, capacity_factor=1.0, rngs=nnx.Rngs(1))
    xb = X.astype(jnp.bfloat16)
    out = router(xb)
    logits = np.asarray(xb, np.float32) @ np.asarray(router.kernel[...], np.float32)
    ref = top_k_routing(jnp.asarray(logits), 2, capacity_factor=1.0)
    np.testing.assert_array_equal(out.routing.expert_index, ref.expert_index)
    np.testing.assert_allclose(out.routing.weight, ref.weight, rtol=1e-5)
    assert out.routing.weight.dtype == jnp.float32


def test_variable_tags_and_jit_split_merge():
    router = Router(16, 4, aux_loss_free=True, rngs=nnx.Rngs(2))
    assert router.kernel.logical_axes == ("embed", "expert")
    params = nnx.state(router, nnx.Param)
    assert (
        len(jax.tree.leaves(params)) == 1
        and len(jax.tree.leaves(nnx.state(router, RouterParam))) == 1
    )
    assert len(jax.tree.leaves(nnx.state(router, RouterBias))) == 1
    graphdef, params, rest = nnx.split(router, RouterParam, ...)

    @jax.jit
    def grad_fn(params, rest, x):
        def f(params):
            out = nnx.merge(graphdef, params, rest)(x, train=True)
            return out.aux_losses["load_balancing"] + out.aux_losses["z_loss"]

        return jax.grad(f)(params)

    g_kernel = np.asarray(grad_fn(params, rest, X)["kernel"][...])
    assert g_kernel.shape == (16, 4) and np.abs(g_kernel).sum() > 0


def test_aux_free_bias_update_balances():
    x = rnd(3, (64, 16)) + 1.0
    router = Router(16, 4, k=1, aux_loss_free=True, rngs=nnx.Rngs(3))
    w = 0.5 * rnd(4, (16, 4))
    router.kernel[...] = w.at[:, 0].add(0.1)
    metrics = router(x).metrics
    before, busiest = float(metrics["max_load"]), int(np.argmax(metrics["load_fraction"]))
    step = nnx.jit(lambda r, x: r.update_bias(r(x).routing, 0.02))
    for _ in range(150):
        step(router, x)
    after = float(router(x).metrics["max_load"])
    assert before > 2.0 and after < 1.2, (before, after)
    assert int(np.argmin(router.bias[...])) == busiest


def test_jitter_only_in_training_and_sequence_granularity():
    router = Router(16, 4, jitter=0.5, rngs=nnx.Rngs(4))
    a, b = router.logits(X), router.logits(X)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(router.logits(X, train=True), a)
    seq = Router(16, 4, k=2, granularity="sequence", rngs=nnx.Rngs(5))
    out = seq(X)
    idx = np.asarray(out.routing.expert_index)
    assert idx.shape == (2, 8, 2) and np.all(idx == idx[:, :1])
    pooled = np.asarray(X).mean(1) @ np.asarray(seq.kernel[...])
    np.testing.assert_array_equal(idx[:, 0, 0], pooled.argmax(-1))


def test_skill_allocator():
    alloc = SkillAllocator(3, 4, num_heads=2, rngs=nnx.Rngs(6))
    w = alloc(jnp.array([0, 2, 2]))
    assert w.shape == (3, 2, 4)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
    assert not np.allclose(alloc(jnp.array([0]), train=True), alloc(jnp.array([0])))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"strategy must be one of \[.*'top_k'.*\], got 'nope'"):
        Router(16, 4, strategy="nope", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="k must be in"):
        Router(16, 4, k=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features"):
        Router(0, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="capacity_factor"):
        Router(16, 4, capacity_factor=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'soft_moe' is dense .*capacity_factor=1.0"):
        Router(16, 4, strategy="soft_moe", capacity_factor=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'task' has no gate to jitter, got jitter=0.1"):
        Router(16, 4, strategy="task", jitter=0.1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="aux_loss_free"):
        Router(16, 4, strategy="soft", aux_loss_free=True, rngs=nnx.Rngs(0))
    router = Router(16, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., S, 16\], got shape \(2, 8, 3\)"):
        router(jnp.zeros((2, 8, 3)))
    with pytest.raises(ValueError, match="x must be a float array"):
        router(jnp.zeros((2, 8, 16), jnp.int32))
    with pytest.raises(ValueError, match="token_ids"):
        Router(16, 4, strategy="hash", rngs=nnx.Rngs(0))(X)
    with pytest.raises(ValueError, match="update_bias needs"):
        router.update_bias(router(X).routing, 0.1)


def test_hash_and_task_strategies_honour_capacity_factor():
    # capacity = ceil(0.5 * 8 * 1 / 4) = 1 slot per expert per sequence
    ids = jnp.zeros((2, 8), jnp.int32)  # every token to one expert
    for strategy, kw in (("hash", {"token_ids": ids}), ("task", {"task_ids": jnp.array([1, 3])})):
        router = Router(16, 4, strategy=strategy, capacity_factor=0.5, rngs=nnx.Rngs(0))
        r = router(X, **kw).routing
        assert r.capacity == 1
        np.testing.assert_array_equal(r.kept[..., 0], [[True] + [False] * 7] * 2)
        dropless = Router(16, 4, strategy=strategy, rngs=nnx.Rngs(0))(X, **kw).routing
        assert dropless.capacity is None and bool(dropless.kept.all())
