import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.routing.balanced import balanced_routing, sinkhorn_plan
from modjax.routing.expert_choice import expert_choice_routing
from modjax.routing.granularity import broadcast_routing, pool_tokens
from modjax.routing.groups import merge_groups, split_groups
from modjax.routing.gumbel import gumbel_softmax_routing, straight_through_routing
from modjax.routing.hash import hash_expert, hash_routing
from modjax.routing.metrics import routing_metrics
from modjax.routing.polytropon import polytropon_routing, skill_allocation
from modjax.routing.soft import soft_moe_routing, soft_routing
from modjax.routing.task import fixed_routing, task_routing
from modjax.routing.top_k import top_k_routing
from tests.routing.routing_reference import rnd, softmax, top_k_reference


def test_expert_choice_matches_loop():
    logits = rnd(0, (10, 4))
    r = jax.jit(lambda x: expert_choice_routing(x, capacity_factor=2.0))(logits)
    c = math.ceil(2.0 * 10 / 4)
    p = softmax(np.asarray(logits))
    d = np.zeros((10, 4, c))
    for e in range(4):
        for j, t in enumerate(np.argsort(-p[:, e], kind="stable")[:c]):
            d[t, e, j] = 1.0
    np.testing.assert_array_equal(r.dispatch, d)
    np.testing.assert_allclose(r.combine, d * p[:, :, None], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r.dispatch.sum((0, 2)), c)  # balanced by construction
    g = jax.grad(lambda x: expert_choice_routing(x, capacity=2).combine.sum())(logits)
    assert np.abs(np.asarray(g)).sum() > 0


def test_expert_choice_nan_and_bad_capacity():
    logits = rnd(1, (4, 2)).at[1, 0].set(jnp.nan)
    r = expert_choice_routing(logits, capacity=4)
    assert float(r.dispatch[1].sum()) == 0 and np.all(np.isfinite(r.combine))
    np.testing.assert_allclose(r.dispatch.sum((0, 2)), 3.0)  # only 3 valid tokens fill slots
    with pytest.raises(ValueError, match="capacity must be <= T=4"):
        expert_choice_routing(logits, capacity=5)
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_choice_routing(logits, capacity_factor=0.0)


def test_hash_routing():
    ids = jnp.array([[3, 7, 3, 100], [0, 1, 2, 3]])
    r = jax.jit(lambda i: hash_routing(i, 5, k=2))(ids)
    h = np.asarray(hash_expert(ids, 5))
    np.testing.assert_array_equal(r.expert_index[..., 0], h)
    np.testing.assert_array_equal(r.expert_index[..., 1], (h + 1) % 5)
    np.testing.assert_array_equal(
        r.expert_index[0, 0], r.expert_index[0, 2]
    )  # same id, same expert
    np.testing.assert_allclose(r.weight, 0.5)
    # a hash that spreads: 4000 ids over 8 experts within 20% of uniform
    load = np.bincount(np.asarray(hash_expert(jnp.arange(4000), 8)), minlength=8)
    assert load.max() / load.mean() < 1.2
    table = jnp.array([2, 0, 1])
    r = hash_routing(jnp.array([[0, 1, 2, 9]]), 3, table=table, capacity=1)
    np.testing.assert_array_equal(r.expert_index[0, :, 0], [2, 0, 1, 1])  # id 9 clipped to table[2]
    np.testing.assert_array_equal(r.kept[0, :, 0], [True, True, True, False])
    with pytest.raises(ValueError, match="token_ids must be an int array"):
        hash_routing(jnp.zeros((4,)), 3)
    with pytest.raises(ValueError, match="k must be in"):
        hash_routing(jnp.zeros((4,), jnp.int32), 3, k=4)


def test_balanced_routing_balances_skewed_scores():
    logits = rnd(2, (32, 4)) + jnp.array([3.0, 1.0, 0.0, 0.0])
    plan = np.exp(np.asarray(sinkhorn_plan(logits, num_iters=50)))
    np.testing.assert_allclose(plan.sum(1), 1.0, rtol=1e-4)
    np.testing.assert_allclose(plan.sum(0), 8.0, rtol=1e-2)
    r = jax.jit(lambda x: balanced_routing(x, num_iters=50, temperature=0.1))(logits)
    assert float(routing_metrics(r)["max_load"]) <= 1.25
    assert float(routing_metrics(top_k_routing(logits, 1))["max_load"]) > 2.0
    np.testing.assert_allclose(
        r.weight[:, 0],
        np.take_along_axis(softmax(np.asarray(logits)), np.asarray(r.expert_index), 1)[:, 0],
        rtol=1e-5,
    )
    nan = balanced_routing(logits.at[3, 1].set(jnp.nan))  # only token 3 is dropped
    assert not nan.kept[3].any() and int(nan.kept.sum()) == 31
    assert np.all((np.asarray(nan.expert_index) >= 0) & (np.asarray(nan.expert_index) < 4))
    g = jax.grad(lambda x: balanced_routing(x).weight.sum())(logits)
    assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).sum() > 0


def test_soft_routing_and_soft_moe():
    logits = rnd(3, (5, 3))
    r = soft_routing(logits, temperature=2.0)
    np.testing.assert_allclose(r.weight, softmax(np.asarray(logits) / 2.0), rtol=1e-5)
    assert r.k == 3 and r.capacity is None and bool(r.kept.all())
    lg = rnd(4, (5, 3, 2))
    sm = jax.jit(soft_moe_routing)(lg)
    a = np.asarray(lg, np.float64)
    disp = np.exp(a) / np.exp(a).sum(0, keepdims=True)
    comb = np.exp(a) / np.exp(a).sum((1, 2), keepdims=True)
    np.testing.assert_allclose(sm.dispatch, disp, rtol=1e-5)
    np.testing.assert_allclose(sm.combine, comb, rtol=1e-5)
    np.testing.assert_allclose(sm.probs, comb.sum(-1), rtol=1e-5)
    with pytest.raises(ValueError, match="rank >= 3"):
        soft_moe_routing(jnp.zeros((5, 3)))


def test_gumbel_and_straight_through():
    logits = rnd(5, (6, 4))
    st = straight_through_routing(logits, 2)
    np.testing.assert_array_equal(
        st.expert_index, top_k_reference(np.asarray(logits), 2)["expert_index"]
    )
    np.testing.assert_allclose(st.weight, 0.5)
    c = rnd(6, (6, 2))
    g = jax.grad(lambda x: jnp.sum(straight_through_routing(x, 2).weight * c))(logits)
    idx = np.asarray(st.expert_index)
    g_ref = jax.grad(lambda x: jnp.sum(jnp.take_along_axis(jax.nn.softmax(x), idx, 1) * c))(logits)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)
    key = jax.random.key(7)
    hard = jax.jit(lambda x, k: gumbel_softmax_routing(x, k, hard=True, temperature=0.5))(
        logits, key
    )
    y = softmax((np.asarray(logits) + np.asarray(jax.random.gumbel(key, (6, 4)))) / 0.5)
    np.testing.assert_array_equal(hard.expert_index[:, 0], y.argmax(-1))
    np.testing.assert_allclose(hard.weight, 1.0, rtol=1e-6)
    soft = gumbel_softmax_routing(logits, key, temperature=0.5)
    np.testing.assert_allclose(soft.weight, y, rtol=1e-4, atol=1e-6)
    for r in (
        straight_through_routing(logits.at[2, 0].set(jnp.nan), 1),
        soft_routing(logits.at[2, 0].set(jnp.nan)),
        gumbel_softmax_routing(logits.at[2, 0].set(jnp.nan), key, hard=True, k=2),
        gumbel_softmax_routing(logits.at[2, 0].set(jnp.nan), key),
    ):
        assert not r.kept[2].any() and float(jnp.abs(r.weight).sum()) > 0
        assert np.all(np.isfinite(r.weight)) and float(jnp.abs(r.weight[2]).sum()) == 0
        assert int(r.expert_index.min()) >= 0 and int(r.expert_index.max()) < 4
    ev = gumbel_softmax_routing(logits, None, hard=True)
    np.testing.assert_array_equal(ev.expert_index[:, 0], np.asarray(logits).argmax(-1))


def test_fixed_and_task_routing():
    r = task_routing(jnp.array([[0, 2, 1]]), 3)
    np.testing.assert_array_equal(r.expert_index[..., 0], [[0, 2, 1]])
    np.testing.assert_allclose(r.weight, 1.0)
    r = task_routing(jnp.array([1, 0]), 4, num_tokens=3, task_to_expert=jnp.array([[0, 1], [2, 3]]))
    np.testing.assert_array_equal(r.expert_index[0], [[2, 3]] * 3)
    np.testing.assert_allclose(r.weight, 0.5)
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, 3\), got values \[5\]"):
        task_routing(jnp.array([0, 5]), 3)
    # traced out-of-range ids: the token is dropped, indices stay in range
    r = jax.jit(lambda t: task_routing(t, 3))(jnp.array([0, 5, -1, 2]))
    np.testing.assert_array_equal(r.kept[:, 0], [True, False, False, True])
    assert np.all((np.asarray(r.expert_index) >= 0) & (np.asarray(r.expert_index) < 3))
    np.testing.assert_allclose(r.weight[:, 0], [1.0, 0.0, 0.0, 1.0])
    f = fixed_routing(jnp.array([[0], [0], [1]]), 2, capacity=1)
    np.testing.assert_array_equal(f.kept[:, 0], [True, False, True])
    with pytest.raises(ValueError, match="task_ids must be an int array"):
        task_routing(jnp.zeros((3,)), 3)


def test_polytropon_skill_allocation():
    logits = rnd(8, (3, 2, 4))
    w = skill_allocation(logits)
    s = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
    np.testing.assert_allclose(w, s / (s.sum(-1, keepdims=True) + 1e-6), rtol=1e-5)
    key = jax.random.key(9)
    ws = jax.jit(lambda x, k: skill_allocation(x, k, temperature=0.5))(logits, key)
    u = np.asarray(jax.random.uniform(key, (3, 2, 4), jnp.float32, 1e-6, 1 - 1e-6), np.float64)
    z = 1 / (1 + np.exp(-(np.asarray(logits) + np.log(u) - np.log1p(-u)) / 0.5))
    np.testing.assert_allclose(ws, z / (z.sum(-1, keepdims=True) + 1e-6), rtol=1e-4)
    out = polytropon_routing(logits, jnp.array([[2, 0]]))
    assert out.shape == (1, 2, 2, 4)
    np.testing.assert_allclose(out[0, 0], w[2], rtol=1e-6)
    g = jax.grad(lambda x: polytropon_routing(x, jnp.array([1]), key)[0, 0, 0])(logits)
    assert np.abs(np.asarray(g[1])).sum() > 0 and float(jnp.abs(g[0]).sum()) == 0
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, 3\)"):
        polytropon_routing(logits, jnp.array([3]))


def test_groups_and_granularity():
    x = jnp.arange(24.0).reshape(2, 6, 2)
    g = split_groups(x, 3)
    assert g.shape == (2, 2, 3, 2)
    np.testing.assert_array_equal(merge_groups(g), x)
    with pytest.raises(ValueError, match="group_size=4 must divide"):
        split_groups(x, 4)
    np.testing.assert_allclose(pool_tokens(x)[:, 0], np.asarray(x).mean(1))
    mask = jnp.array([[True, False] * 3, [True] * 6])
    np.testing.assert_allclose(pool_tokens(x, mask)[0, 0], np.asarray(x)[0, ::2].mean(0))
    seq = top_k_routing(rnd(10, (2, 1, 4)), 2)
    r = broadcast_routing(seq, 5)
    assert r.expert_index.shape == (2, 5, 2) and r.capacity is None
    np.testing.assert_array_equal(r.expert_index, np.broadcast_to(seq.expert_index, (2, 5, 2)))
    np.testing.assert_array_equal(r.slot[..., 0], np.tile(np.arange(5), (2, 1)))


def test_gradients_of_differentiable_routers_match_written_out_formulas():
    logits = rnd(11, (6, 4))
    c = rnd(12, (6, 4))
    key = jax.random.key(13)
    gumbel = jax.random.gumbel(key, (6, 4))
    cases = [
        (
            lambda x: soft_routing(x, temperature=2.0).weight,
            lambda x: jax.nn.softmax(x / 2.0),
        ),
        (
            lambda x: gumbel_softmax_routing(x, key, temperature=0.5).weight,
            lambda x: jax.nn.softmax((x + gumbel) / 0.5),
        ),
    ]
    for routed, formula in cases:
        g = jax.jit(jax.grad(lambda x, f=routed: jnp.sum(f(x) * c)))(logits)
        g_ref = jax.grad(lambda x, f=formula: jnp.sum(f(x) * c))(logits)
        np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)
        assert np.abs(np.asarray(g)).sum() > 0
    # expert choice: the selection is fixed, the combine weights are the probabilities
    dispatch = np.asarray(expert_choice_routing(logits, capacity=3).dispatch)
    cc = rnd(14, dispatch.shape)
    g = jax.jit(jax.grad(lambda x: jnp.sum(expert_choice_routing(x, capacity=3).combine * cc)))(
        logits
    )
    g_ref = jax.grad(lambda x: jnp.sum(dispatch * jax.nn.softmax(x)[:, :, None] * cc))(logits)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-7)
    # Soft MoE: dispatch normalised over tokens, combine over (expert, slot)
    lg = rnd(15, (5, 3, 2))
    cd, cm = rnd(16, (5, 3, 2)), rnd(17, (5, 3, 2))

    def soft_moe_loss(x):
        r = soft_moe_routing(x)
        return jnp.sum(r.dispatch * cd) + jnp.sum(r.combine * cm)

    def soft_moe_formula(x):
        comb = jax.nn.softmax(x.reshape(5, 6), -1).reshape(5, 3, 2)
        return jnp.sum(jax.nn.softmax(x, 0) * cd) + jnp.sum(comb * cm)

    g = jax.jit(jax.grad(soft_moe_loss))(lg)
    np.testing.assert_allclose(g, jax.grad(soft_moe_formula)(lg), rtol=1e-5, atol=1e-7)
