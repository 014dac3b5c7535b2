import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.routing.top_k import queue_slots, top_k_routing
from tests.routing.routing_reference import rnd, top_k_reference


def _check_against_reference(r, ref):
    np.testing.assert_array_equal(r.expert_index, ref["expert_index"])
    np.testing.assert_array_equal(r.kept, ref["kept"])
    np.testing.assert_array_equal(
        np.where(ref["kept"], r.slot, 0), np.where(ref["kept"], ref["slot"], 0)
    )
    np.testing.assert_allclose(r.weight, ref["weight"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.probs, ref["probs"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "k,cf,bp", [(1, None, False), (1, 1.0, False), (2, 1.0, False), (2, 0.5, True), (3, 1.25, True)]
)
def test_matches_loop_reference(k, cf, bp):
    logits = rnd(k, (24, 6), 2.0)
    r = jax.jit(lambda x: top_k_routing(x, k, capacity_factor=cf, batch_priority=bp))(logits)
    cap = None if cf is None else math.ceil(cf * 24 * k / 6)
    assert r.capacity == cap and r.num_experts == 6
    _check_against_reference(r, top_k_reference(np.asarray(logits), k, cap, bp))
    if cap is not None:
        # every kept (expert, slot) pair is unique and in range
        pairs = {
            (int(e), int(s))
            for e, s, kk in zip(r.expert_index.ravel(), r.slot.ravel(), r.kept.ravel())
            if kk
        }
        assert len(pairs) == int(r.kept.sum()) and all(s < cap for _, s in pairs)


def test_bias_changes_selection_not_weights():
    logits = rnd(1, (16, 4))
    bias = jnp.array([5.0, 0.0, 0.0, 0.0])
    r = top_k_routing(logits, 1, bias=bias)
    assert np.all(r.expert_index[:, 0] == 0)
    p = np.asarray(jax.nn.softmax(logits))
    np.testing.assert_allclose(r.weight[:, 0], p[:, 0], rtol=1e-6)
    _check_against_reference(r, top_k_reference(np.asarray(logits), 1, bias=np.asarray(bias)))


def test_groups_are_routed_independently():
    logits = rnd(2, (3, 2, 8, 4))
    r = top_k_routing(logits, 2, capacity=3)
    assert r.expert_index.shape == (3, 2, 8, 2) and r.probs.shape == (3, 2, 8, 4)
    for a in range(3):
        for b in range(2):
            _check_against_reference(
                jax.tree.map(lambda y, a=a, b=b: y[a, b], r),
                top_k_reference(np.asarray(logits[a, b]), 2, 3),
            )


def test_gradient_matches_reference_formula():
    logits = rnd(3, (10, 5))
    c = rnd(4, (10, 2))

    def f(x):
        return jnp.sum(top_k_routing(x, 2, capacity=3).weight * c)

    idx = np.asarray(top_k_routing(logits, 2, capacity=3).expert_index)
    kept = np.asarray(top_k_routing(logits, 2, capacity=3).kept)

    def g(x):  # same selection, written out
        p = jax.nn.softmax(x)
        w = jnp.take_along_axis(p, idx, -1)
        w = w / w.sum(-1, keepdims=True)
        return jnp.sum(jnp.where(kept, w, 0) * c)

    np.testing.assert_allclose(jax.grad(f)(logits), jax.grad(g)(logits), rtol=1e-5, atol=1e-7)
    # k = 1: weight is the top-1 probability, so the router gets a gradient
    g1 = jax.grad(lambda x: top_k_routing(x, 1).weight.sum())(logits)
    assert np.abs(np.asarray(g1)).sum() > 0


def test_all_tokens_prefer_one_expert_capacity_one():
    logits = jnp.tile(jnp.array([[4.0, 1.0, 0.0, -1.0]]), (6, 1))
    r = top_k_routing(logits, 1, capacity=1)
    np.testing.assert_array_equal(r.expert_index[:, 0], 0)
    np.testing.assert_array_equal(r.kept[:, 0], [True] + [False] * 5)
    np.testing.assert_array_equal(r.slot[:, 0], np.arange(6))
    assert float(r.weight[1:].sum()) == 0.0
    # batch priority: the most confident token wins the single slot
    logits = logits.at[4, 0].set(9.0)
    r = top_k_routing(logits, 1, capacity=1, batch_priority=True)
    np.testing.assert_array_equal(r.kept[:, 0], [False, False, False, False, True, False])


def test_k_equals_num_experts_and_empty_experts():
    logits = rnd(5, (7, 3))
    r = top_k_routing(logits, 3)
    np.testing.assert_array_equal(np.sort(r.expert_index, -1), np.tile(np.arange(3), (7, 1)))
    np.testing.assert_allclose(r.weight.sum(-1), 1.0, rtol=1e-6)
    # two experts never chosen: their queues stay empty, nothing is out of range
    logits = jnp.zeros((5, 4)).at[:, 1].set(3.0)
    r = top_k_routing(logits, 1, capacity_factor=1.0)
    assert r.capacity == 2 and np.all(r.expert_index == 1) and int(r.kept.sum()) == 2


def test_ties_pick_lower_expert_index():
    r = top_k_routing(jnp.zeros((4, 5)), 2)
    np.testing.assert_array_equal(r.expert_index, np.tile([0, 1], (4, 1)))
    np.testing.assert_allclose(r.weight, 0.5)


def test_nan_token_is_dropped_in_range():
    logits = rnd(6, (6, 4)).at[2, 1].set(jnp.nan)
    r = jax.jit(lambda x: top_k_routing(x, 2, capacity=2))(logits)
    assert np.all((np.asarray(r.expert_index) >= 0) & (np.asarray(r.expert_index) < 4))
    assert not r.kept[2].any() and float(jnp.abs(r.weight[2]).sum()) == 0.0
    assert np.all(np.isnan(r.probs[2]))
    # the NaN token takes no slot: the others route as if it were absent
    rest = np.delete(np.asarray(logits), 2, axis=0)
    ref = top_k_reference(rest, 2, 2)
    np.testing.assert_array_equal(np.delete(np.asarray(r.kept), 2, 0), ref["kept"])
    assert np.all(np.isfinite(r.weight))


def test_queue_slots_order():
    idx = jnp.array([[0, 1], [0, 1], [1, 0]])
    np.testing.assert_array_equal(queue_slots(idx, 2), [[0, 1], [1, 2], [0, 2]])
    np.testing.assert_array_equal(
        queue_slots(idx, 2, order=jnp.array([2, 1, 0])), [[1, 2], [0, 1], [0, 2]]
    )


@pytest.mark.parametrize(
    "kwargs,exc,needle",
    [
        ({"logits": jnp.zeros((4,)), "k": 1}, ValueError, "rank"),
        ({"logits": jnp.zeros((4, 3), jnp.int32), "k": 1}, ValueError, "int32"),
        ({"logits": jnp.zeros((4, 3)), "k": 4}, ValueError, "got 4"),
        ({"logits": jnp.zeros((4, 3)), "k": 0}, ValueError, "got 0"),
        ({"logits": jnp.zeros((4, 3)), "k": 1.5}, TypeError, "1.5"),
        (
            {"logits": jnp.zeros((4, 3)), "k": 1, "capacity_factor": 0.0},
            ValueError,
            "capacity_factor",
        ),
        ({"logits": jnp.zeros((4, 3)), "k": 1, "capacity_factor": -1}, ValueError, "-1"),
        ({"logits": jnp.zeros((4, 3)), "k": 1, "capacity": 0}, ValueError, "capacity"),
        (
            {"logits": jnp.zeros((4, 3)), "k": 1, "capacity": 2, "capacity_factor": 1.0},
            ValueError,
            "not both",
        ),
        ({"logits": jnp.zeros((4, 3)), "k": 1, "bias": jnp.zeros((4,))}, ValueError, "bias"),
    ],
)
def test_bad_input(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        jax.jit(lambda: top_k_routing(**kwargs))()
