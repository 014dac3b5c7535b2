"""FFN math: dense FFN, grouped expert FFN, and every MoE strategy vs a per-expert loop.

``MODJAX_GPU_TESTS=1`` (on a GPU) runs the dropless path through the compiled Pallas
kernels in bfloat16 with bf16 tolerances; otherwise Pallas runs in interpret mode.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.computation import ffn as F
from modjax.routing.types import Routing

GPU = os.environ.get("MODJAX_GPU_TESTS") == "1"
DTYPE = jnp.bfloat16 if GPU else jnp.float32
TOL = dict(rtol=3e-2, atol=3e-2) if GPU else dict(rtol=2e-4, atol=2e-4)
# float32 checks: on GPU, f32 dots run in TF32 by default (~1e-3 relative error).
F32 = dict(rtol=5e-3, atol=5e-3) if GPU else None


def make_routing(logits, k, capacity=None):
    """Softmax top-k with choice-major slots (hand-made: independent of the router)."""
    t, e = logits.shape
    probs = jax.nn.softmax(logits, axis=-1)
    weight, index = jax.lax.top_k(probs, k)
    index = index.astype(jnp.int32)
    flat = index.T.reshape(-1)
    slot = (jnp.cumsum(jax.nn.one_hot(flat, e, dtype=jnp.int32), 0) - 1)[jnp.arange(t * k), flat]
    slot = slot.reshape(k, t).T.astype(jnp.int32)
    kept = jnp.ones_like(index, bool) if capacity is None else slot < capacity
    return Routing(index, jnp.where(kept, weight, 0.0), kept, slot, probs, e, capacity)


def make_logits(rng, t, e, kind):
    logits = rng.normal(size=(t, e)).astype(np.float32)
    if kind == "skewed":
        hot = rng.random(t) < 0.8
        logits[hot, :2] += 20.0
    if kind == "empty":  # experts 1 and e-1 never chosen
        logits[:, [1, e - 1]] -= 100.0
    return jnp.asarray(logits)


def make_params(rng, e, d, f, activation="swiglu", dtype=jnp.float32):
    names = (*F.ACTIVATIONS[activation], "wo")
    shapes = {n: (e, d, f) for n in names[:-1]} | {"wo": (e, f, d)}
    return {n: jnp.asarray(rng.normal(size=s) / np.sqrt(s[1]), dtype) for n, s in shapes.items()}


def per_token_loop(x, routing, params, activation):
    """numpy: for every token and choice, run the chosen expert by hand."""
    x = np.float64(x)
    p = {n: np.float64(v) for n, v in params.items()}
    idx, w = np.asarray(routing.expert_index), np.float64(routing.weight)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            if activation == "swiglu":
                g = x[t] @ p["wi_gate"][e]
                h = g / (1 + np.exp(-g)) * (x[t] @ p["wi_up"][e])
            else:
                a = x[t] @ p["wi"][e]
                h = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a**3)))
            y[t] += w[t, j] * (h @ p["wo"][e])
    return y


STRATS = [
    ("dropless", "xla"),
    ("dropless", "pallas"),
    ("dropless", "reference"),
    ("capacity", "auto"),
    ("einsum", "auto"),
]


def _moe(strategy, impl, activation="swiglu"):
    def f(x, logits, params, k, capacity=None):
        r = make_routing(logits, k, capacity)
        return F.moe_ffn(
            x, r, params, activation=activation, strategy=strategy, impl=impl, block_size=16,
            interpret=not GPU,
        )  # fmt: skip

    return f


def test_reference_matches_numpy_loop():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(13, 12)), jnp.float32)
    for act in ("swiglu", "gelu"):
        params = make_params(rng, 5, 12, 20, act)
        r = make_routing(make_logits(rng, 13, 5, "random"), 3)
        got = F.moe_ffn_reference(x, r, params, activation=act)
        np.testing.assert_allclose(
            got, per_token_loop(x, r, params, act), **(F32 or dict(rtol=1e-4, atol=1e-5))
        )


@pytest.mark.parametrize("impl", ["auto"] if GPU else ["reference", "pallas"])
def test_dropless_with_the_combine_in_the_ffn_backward(impl, monkeypatch):
    # F < D: the layer takes grouped_swiglu.swiglu_ffn_combine (where the FFN's output is
    # not read back in the backward) on the grouped path; against the per-expert reference
    from modjax.kernels import grouped_swiglu as gs

    taken = []
    one_op = gs.swiglu_ffn_combine
    monkeypatch.setattr(
        gs, "swiglu_ffn_combine", lambda *a, **kw: taken.append(1) or one_op(*a, **kw)
    )
    rng = np.random.default_rng(3)
    t, d, f, e, k = 29, 40, 24, 5, 2
    x = jnp.asarray(rng.normal(size=(t, d)), DTYPE)
    logits = make_logits(rng, t, e, "skewed")
    params = make_params(rng, e, d, f, dtype=DTYPE)
    ct = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    fast = _moe("dropless", impl)

    def ref(x, logits, params):
        p32 = {n: v.astype(jnp.float32) for n, v in params.items()}
        return F.moe_ffn_reference(x.astype(jnp.float32), make_routing(logits, k), p32)

    y = jax.jit(fast, static_argnums=3)(x, logits, params, k)
    assert taken
    np.testing.assert_allclose(np.float32(y), ref(x, logits, params), **TOL)
    loss_f = lambda *a: jnp.sum(fast(*a, k).astype(jnp.float32) * ct)
    gf = jax.grad(loss_f, argnums=(0, 1, 2))(x, logits, params)
    gr = jax.grad(lambda *a: jnp.sum(ref(*a) * ct), argnums=(0, 1, 2))(x, logits, params)
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gr), strict=True):
        scale = max(float(jnp.abs(b).max()), 1e-6)
        np.testing.assert_allclose(np.float32(a) / scale, np.float32(b) / scale, **TOL)


@pytest.mark.parametrize("strategy,impl", STRATS)
@pytest.mark.parametrize("k,kind", [(1, "random"), (2, "skewed"), (3, "empty"), (4, "random")])
def test_moe_strategies_values_and_grads(strategy, impl, k, kind):
    if not GPU and impl == "pallas" and k > 2:
        pytest.skip("interpret-mode Pallas is slow on CPU: two cases suffice there")
    rng = np.random.default_rng(10 * k + len(kind))
    t, d, f, e = 37, 24, 40, 6  # multiples of no block or tile size
    x = jnp.asarray(rng.normal(size=(t, d)), DTYPE)
    logits = make_logits(rng, t, e, kind)
    params = make_params(rng, e, d, f, dtype=DTYPE)
    fast = _moe(strategy, impl)

    def ref(x, logits, params):
        x32 = x.astype(jnp.float32)
        p32 = {n: v.astype(jnp.float32) for n, v in params.items()}
        return F.moe_ffn_reference(x32, make_routing(logits, k), p32)

    y = jax.jit(fast, static_argnums=3)(x, logits, params, k)
    assert y.dtype == DTYPE
    np.testing.assert_allclose(np.float32(y), ref(x, logits, params), **TOL)
    if not GPU:  # the independent numpy loop (float64)
        want = per_token_loop(x, make_routing(logits, k), params, "swiglu")
        np.testing.assert_allclose(y, want, **(F32 or dict(rtol=2e-4, atol=2e-4)))
    ct = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    loss_f = lambda *a: jnp.sum(fast(*a, k).astype(jnp.float32) * ct)
    loss_r = lambda *a: jnp.sum(ref(*a) * ct)
    gf = jax.grad(loss_f, argnums=(0, 1, 2))(x, logits, params)
    gr = jax.grad(loss_r, argnums=(0, 1, 2))(x, logits, params)
    for a, b in zip(jax.tree.leaves(gf), jax.tree.leaves(gr)):
        scale = max(float(jnp.abs(b).max()), 1e-6)
        np.testing.assert_allclose(np.float32(a) / scale, np.float32(b) / scale, **TOL)


@pytest.mark.parametrize("strategy", ["capacity", "einsum"])
def test_capacity_drops_over_capacity(strategy):
    rng = np.random.default_rng(3)
    t, d, f, e, k, c = 40, 16, 24, 4, 2, 7
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    logits = make_logits(rng, t, e, "skewed")
    params = make_params(rng, e, d, f)
    r = make_routing(logits, k, capacity=c)
    assert not bool(r.kept.all())  # the test must actually drop
    y = F.moe_ffn(x, r, params, strategy=strategy)
    np.testing.assert_allclose(
        y, per_token_loop(x, r, params, "swiglu"), **(F32 or dict(rtol=2e-4, atol=2e-4))
    )
    # dropless computes every kept assignment: equal on the same (capacity) routing.
    y_dl = F.moe_ffn(x, r, params, strategy="dropless", block_size=16)
    np.testing.assert_allclose(y_dl, y, **(F32 or dict(rtol=2e-4, atol=2e-4)))


@pytest.mark.parametrize("strategy,impl", [("dropless", "xla"), ("capacity", "auto")])
def test_gelu_experts(strategy, impl):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(21, 16)), jnp.float32)
    params = make_params(rng, 5, 16, 24, "gelu")
    r = make_routing(make_logits(rng, 21, 5, "random"), 2)
    y = F.moe_ffn(x, r, params, activation="gelu", strategy=strategy, impl=impl, block_size=16)
    np.testing.assert_allclose(
        y, per_token_loop(x, r, params, "gelu"), **(F32 or dict(rtol=2e-4, atol=2e-4))
    )


def test_grouped_ffn_expert_fn_seam():
    """``expert_fn(params, x_sorted, group_sizes)``: the expert-parallel interface."""
    rng = np.random.default_rng(5)
    e, d, f, n = 4, 16, 24, 30
    params = make_params(rng, e, d, f)
    sizes = jnp.asarray([7, 0, 12, 5], jnp.int32)  # 24 rows used, 6 padding rows
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    fn = F.make_expert_fn("swiglu", block_size=16, impl="xla")
    got = jax.jit(fn)(params, x, sizes)
    ids = np.repeat(np.arange(e), np.asarray(sizes))
    for i, ex in enumerate(ids):
        pe = {k: v[ex] for k, v in params.items()}
        np.testing.assert_allclose(got[i], F.ffn(x[i], pe), **(F32 or dict(rtol=1e-4, atol=1e-5)))
    assert (np.asarray(got[len(ids) :]) == 0).all()


def test_grouped_ffn_padding_rows_enter_no_matmul():
    # An expert-parallel buffer sized for the worst case is mostly padding. Padding rows
    # join no group: even NaN there leaves values and gradients equal to no padding.
    rng = np.random.default_rng(8)
    e, d, f = 3, 8, 12
    params = make_params(rng, e, d, f)
    sizes = jnp.asarray([5, 0, 9], jnp.int32)
    x = jnp.asarray(rng.normal(size=(14, d)), jnp.float32)
    x_pad = jnp.concatenate([x, jnp.full((50, d), jnp.nan)])
    fn = F.make_expert_fn("swiglu", block_size=8, impl="xla")

    def loss(p, x):
        return jnp.sum(jnp.sin(fn(p, x, sizes)[:14]))

    want, want_g = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
    got, got_g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x_pad)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(got_g[0][name], want_g[0][name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_g[1][:14], want_g[1], rtol=1e-5, atol=1e-6)
    assert (np.asarray(got_g[1][14:]) == 0).all()


def test_dense_ffn_matches_numpy():
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(5, 8)), jnp.float32)
    p = {n: v[0] for n, v in make_params(rng, 1, 8, 12).items()}
    g = np.float64(x) @ np.float64(p["wi_gate"])
    want = (g / (1 + np.exp(-g)) * (np.float64(x) @ np.float64(p["wi_up"]))) @ p["wo"]
    np.testing.assert_allclose(F.ffn(x, p), want, **(F32 or dict(rtol=1e-5, atol=1e-5)))


def test_bad_inputs_raise():
    rng = np.random.default_rng(7)
    params = make_params(rng, 4, 8, 12)
    x = jnp.ones((6, 8))
    r = make_routing(make_logits(rng, 6, 4, "random"), 2)
    with pytest.raises(ValueError, match=r"x must be \[T, D=8\], got shape \(6, 9\)"):
        F.moe_ffn(jnp.ones((6, 9)), r, params)
    with pytest.raises(ValueError, match="strategy must be one of"):
        F.moe_ffn(x, r, params, strategy="soft")
    with pytest.raises(ValueError, match="activation must be one of"):
        F.moe_ffn(x, r, params, activation="relu6")
    with pytest.raises(ValueError, match="routing has num_experts=5, params have E=4"):
        F.moe_ffn(x, make_routing(make_logits(rng, 6, 5, "random"), 2), params)
    with pytest.raises(ValueError, match=r"params\['wo'\] must be"):
        F.moe_ffn(x, r, params | {"wo": jnp.ones((4, 12, 7))})
    with pytest.raises(ValueError, match="dtype must be one of"):
        F.moe_ffn(x.astype(jnp.int32), r, params, impl="xla")
    with pytest.raises(TypeError, match="routing must be a Routing"):
        F.moe_ffn(x, {"expert_index": 0}, params)
