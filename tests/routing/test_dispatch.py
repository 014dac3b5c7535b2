import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.routing.dispatch import combine, dispatch
from modjax.routing.expert_choice import expert_choice_routing
from modjax.routing.soft import soft_moe_routing
from modjax.routing.top_k import top_k_routing
from tests.routing.routing_reference import combine_reference, dispatch_reference, rnd


@pytest.mark.parametrize("capacity", [None, 2])
def test_sparse_dispatch_combine_match_loops(capacity):
    logits = rnd(0, (9, 3))
    x = rnd(1, (9, 5))
    r = top_k_routing(logits, 2, capacity=capacity)
    c = r.buffer_capacity()
    buf = jax.jit(dispatch)(x, r)
    assert buf.shape == (3, c, 5)
    args = [np.asarray(a) for a in (r.expert_index, r.slot, r.kept)]
    np.testing.assert_allclose(buf, dispatch_reference(np.asarray(x), *args, 3, c), rtol=1e-6)
    out = jnp.tanh(buf) + 1.0
    y = jax.jit(combine)(out, r)
    ref = combine_reference(np.asarray(out), *args, np.asarray(r.weight))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    # the sparse path equals the one-hot einsum path of the same decision
    dense = r.to_dense()
    np.testing.assert_allclose(dispatch(x, dense), buf, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(combine(out, dense), y, rtol=1e-5, atol=1e-6)


def test_gradients_match_dense_path():
    logits = rnd(2, (8, 4))
    x = rnd(3, (8, 3))
    w = rnd(4, (4, 3, 3))

    def layer(x, logits, use_dense):
        r = top_k_routing(logits, 2, capacity=3)
        r = r.to_dense() if use_dense else r
        h = jnp.einsum("ecd,edf->ecf", dispatch(x, r), w)
        return jnp.sum(combine(jnp.sin(h), r) ** 2)

    gs = jax.grad(layer, argnums=(0, 1))(x, logits, False)
    gd = jax.grad(layer, argnums=(0, 1))(x, logits, True)
    for a, b in zip(gs, gd):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(gs[1])).sum() > 0


def test_dropped_slot_with_nan_output_adds_zero():
    logits = jnp.zeros((4, 2)).at[:, 0].set(1.0)
    r = top_k_routing(logits, 1, capacity=1)
    out = jnp.ones((2, 1, 2)).at[1].set(jnp.nan)  # expert 1 is empty
    y = combine(out, r)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y[1:], 0.0)


def test_dense_routing_einsum_and_groups():
    logits = rnd(5, (2, 6, 3, 2))
    x = rnd(6, (2, 6, 4))
    r = soft_moe_routing(logits)
    buf = dispatch(x, r)
    assert buf.shape == (2, 3, 2, 4)
    d = np.asarray(r.dispatch)
    ref = np.einsum("gtec,gtd->gecd", d, np.asarray(x))
    np.testing.assert_allclose(buf, ref, rtol=1e-5, atol=1e-6)
    y = combine(buf, r)
    np.testing.assert_allclose(
        y, np.einsum("gtec,gecd->gtd", np.asarray(r.combine), ref), rtol=1e-5, atol=1e-6
    )
    # sparse decisions with a leading group axis
    r2 = expert_choice_routing(logits.sum(-1), capacity=2)
    assert dispatch(x, r2).shape == (2, 3, 2, 4)
    rs = top_k_routing(logits.sum(-1), 1, capacity=2)
    b = dispatch(x, rs)
    for g in range(2):
        args = [np.asarray(a[g]) for a in (rs.expert_index, rs.slot, rs.kept)]
        np.testing.assert_allclose(
            b[g], dispatch_reference(np.asarray(x[g]), *args, 3, 2), rtol=1e-6
        )


def test_bad_shapes():
    r = top_k_routing(jnp.zeros((4, 2)), 1)
    with pytest.raises(ValueError, match=r"x must have shape \(4,\)"):
        dispatch(jnp.zeros((5, 3)), r)
    with pytest.raises(ValueError, match="expert_out"):
        combine(jnp.zeros((2, 3, 3)), r)
    with pytest.raises(TypeError, match="routing"):
        dispatch(jnp.zeros((4, 3)), {"a": 1})


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("capacity", [None, 2])
def test_gather_only_dispatch_combine_equal_reference_values_and_grads(k, capacity):
    from modjax.routing.dispatch import combine_reference, dispatch_reference

    # two routing groups (a leading axis), 11 tokens, 5 experts; capacity 2 drops some
    logits, x = rnd(10 + k, (2, 11, 5)), rnd(20 + k, (2, 11, 6))
    w = rnd(30 + k, (5, 6, 6))
    r = top_k_routing(logits, k, capacity=capacity)
    if capacity:
        assert not bool(r.kept.all())  # some assignments are dropped

    def layer(x, logits, fns):
        disp, comb = fns
        rr = top_k_routing(logits, k, capacity=capacity)
        h = jnp.einsum("gecd,edf->gecf", disp(x, rr), w)
        return jnp.sum(comb(jnp.sin(h), rr) ** 2)

    fast, ref = (dispatch, combine), (dispatch_reference, combine_reference)
    np.testing.assert_array_equal(dispatch(x, r), dispatch_reference(x, r))
    out = jnp.cos(dispatch(x, r))
    np.testing.assert_allclose(combine(out, r), combine_reference(out, r), rtol=1e-6)
    gf = jax.grad(layer, (0, 1))(x, logits, fast)
    gr = jax.grad(layer, (0, 1))(x, logits, ref)
    for a, b in zip(gf, gr):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(gf[1]).sum()) > 0  # the router gets a gradient


def test_dispatch_combine_gradients_have_no_scatter():
    from modjax.routing.dispatch import combine_reference

    logits, x = rnd(40, (16, 4)), rnd(41, (16, 8))
    c = top_k_routing(logits, 2, capacity=5).buffer_capacity()
    out = jnp.ones((4, c, 8))

    def loss(x, out, logits, comb=combine):
        r = top_k_routing(logits, 2, capacity=5)  # traced: the slot maps are not constants
        return jnp.sum(dispatch(x, r) ** 2) + jnp.sum(comb(out, r) ** 2)

    def scatters(fn):  # the result types of the compiled program's scatters
        text = jax.jit(fn).lower(x, out, logits).compile().as_text()
        return [ln.split("=")[1].split()[0] for ln in text.splitlines() if " scatter(" in ln]

    # the only scatter left is the int32 slot -> assignment map, built in the forward
    got = scatters(jax.grad(loss, (0, 1)))
    assert got and all(t.startswith("s32") for t in got), got
    # the plain twin's gradient scatter-adds float rows
    ref = scatters(jax.grad(lambda x, o, lg: loss(x, o, lg, combine_reference), (0, 1)))
    assert any(t.startswith("f32") for t in ref), ref
