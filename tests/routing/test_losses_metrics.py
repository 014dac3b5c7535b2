import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from modjax.routing.expert_choice import expert_choice_routing
from modjax.routing.losses import (
    aux_free_bias_update,
    importance_loss,
    load_balancing_loss,
    load_loss,
    router_z_loss,
    sequence_balance_loss,
)
from modjax.routing.metrics import routing_metrics
from modjax.routing.top_k import top_k_routing
from tests.routing.routing_reference import rnd, softmax


def test_switch_loss_matches_formula_and_grad_moves_mass_away():
    logits = rnd(0, (2, 12, 4)) + jnp.array([2.0, 0, 0, 0])
    r = top_k_routing(logits, 2, capacity=4)
    p = softmax(np.asarray(logits)).reshape(-1, 4)
    idx = np.asarray(r.expert_index).reshape(-1, 2)
    f = np.bincount(idx.ravel(), minlength=4) / idx.size  # before capacity drops
    np.testing.assert_allclose(load_balancing_loss(r), 4 * np.sum(f * p.mean(0)), rtol=1e-5)
    g = jax.grad(lambda x: load_balancing_loss(top_k_routing(x, 2, capacity=4)))(logits)
    stepped = logits - 1.0 * g
    # a gradient step lowers the overloaded expert's mean probability
    assert float(jax.nn.softmax(stepped)[..., 0].mean()) < float(
        jax.nn.softmax(logits)[..., 0].mean()
    )
    # balanced decision -> loss 1
    assert float(load_balancing_loss(expert_choice_routing(jnp.zeros((8, 4)), capacity=2))) == 1.0


def test_z_and_sequence_losses():
    logits = rnd(1, (3, 5, 4)) * 3
    a = np.asarray(logits, np.float64)
    lse = np.log(np.exp(a).sum(-1))
    np.testing.assert_allclose(jax.jit(router_z_loss)(logits), np.mean(lse**2), rtol=1e-5)
    g = jax.grad(router_z_loss)(logits)
    np.testing.assert_allclose(g, 2 * lse[..., None] * softmax(a) / lse.size, rtol=1e-4, atol=1e-7)
    r = top_k_routing(logits, 1)
    p = softmax(a)
    ref = 0.0
    for b in range(3):
        cnt = np.bincount(np.asarray(r.expert_index[b, :, 0]), minlength=4)
        ref += np.sum(4 / 5 * cnt * p[b].mean(0))
    np.testing.assert_allclose(sequence_balance_loss(r), ref / 3, rtol=1e-5)
    with pytest.raises(ValueError, match="float"):
        router_z_loss(jnp.zeros((3, 4), jnp.int32))


def test_importance_and_load_losses():
    gates = jnp.abs(rnd(2, (6, 4)))
    imp = np.asarray(gates).sum(0)
    np.testing.assert_allclose(importance_loss(gates), imp.var() / imp.mean() ** 2, rtol=1e-5)
    r = top_k_routing(jnp.asarray(gates), 1)
    np.testing.assert_allclose(importance_loss(r), importance_loss(r.dense_weights()), rtol=1e-6)
    clean = rnd(3, (6, 4))
    noisy = clean + 0.5 * rnd(4, (6, 4))
    k = 2
    c, n = np.asarray(clean, np.float64), np.asarray(noisy, np.float64)
    prob = np.zeros((6, 4))
    for t in range(6):
        for e in range(4):
            others = np.sort(np.delete(n[t], e))[::-1]
            prob[t, e] = norm.cdf((c[t, e] - others[k - 1]) / 0.5)
    load = prob.sum(0)
    np.testing.assert_allclose(
        load_loss(clean, noisy, 0.5, k), load.var() / load.mean() ** 2, rtol=1e-4
    )
    g = jax.grad(load_loss)(clean, noisy, 0.5, k)
    assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).sum() > 0
    with pytest.raises(ValueError, match="k must be an int in"):
        load_loss(clean, noisy, 0.5, 4)


def test_aux_free_bias_balances_skewed_scores():
    logits = rnd(5, (256, 8)) + jnp.linspace(3.0, 0.0, 8)
    before = routing_metrics(top_k_routing(logits, 2))["max_load"]
    assert float(before) > 2.0

    @jax.jit
    def step(bias, _):
        r = top_k_routing(logits, 2, bias=bias)
        return aux_free_bias_update(bias, r, 0.02), None

    bias, _ = jax.lax.scan(step, jnp.zeros(8), None, length=300)
    r = top_k_routing(logits, 2, bias=bias)
    assert float(routing_metrics(r)["max_load"]) < 1.2
    # selection only: weights are still the unbiased probabilities
    chosen = np.take_along_axis(softmax(np.asarray(logits)), np.asarray(r.expert_index), 1)
    np.testing.assert_allclose(r.weight, chosen / chosen.sum(-1, keepdims=True), rtol=1e-5)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        aux_free_bias_update(jnp.zeros(3), r, 0.1)
    with pytest.raises(ValueError, match="rate"):
        aux_free_bias_update(bias, r, -0.1)


def test_metrics_against_hand_computed():
    logits = jnp.log(
        jnp.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.2, 0.5, 0.3]])
    )
    r = top_k_routing(logits, 1, capacity=2)  # experts [0, 0, 0, 1]: third token dropped
    m = jax.jit(routing_metrics)(r)
    np.testing.assert_allclose(m["load_fraction"], [2 / 3, 1 / 3, 0], rtol=1e-6)
    np.testing.assert_allclose(m["max_load"], 2.0, rtol=1e-6)
    np.testing.assert_allclose(m["load_cv"], np.std([2, 1, 0]) / 1.0, rtol=1e-6)
    np.testing.assert_allclose(m["dropped_fraction"], 0.25)
    np.testing.assert_allclose(m["num_dropped"], 1.0)
    p = np.exp(np.asarray(logits, np.float64))
    np.testing.assert_allclose(m["entropy"], np.mean(-(p * np.log(p)).sum(-1)), rtol=1e-5)
    np.testing.assert_allclose(m["confidence"], np.mean([0.7, 0.6, 0.5, 0.5]), rtol=1e-5)
    ec = routing_metrics(expert_choice_routing(jnp.zeros((4, 2)).at[0, 0].set(5.0), capacity=1))
    # expert choice: expert 0 takes token 0, expert 1 the first of the tied tokens 1-3
    np.testing.assert_allclose(ec["dropped_fraction"], 0.5)
    np.testing.assert_allclose(ec["max_load"], 1.0)
    with pytest.raises(TypeError, match="routing must be"):
        routing_metrics(logits)
