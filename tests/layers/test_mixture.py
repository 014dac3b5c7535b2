"""Mixture of modules and the composition blocks, against manual composition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modjax import routing as R
from modjax.layers.blocks import Average, BatchSplit
from modjax.layers.lora import LoRA
from modjax.layers.mixture import AGGREGATORS, Mixture, MixtureOfAdapters, merge_modules
from modjax.layers.router import Router
from tests.layers.composition_reference import D, close, linears, np_linear, rand_x

# ------------------------------------------------------------------------- Mixture


def test_weighted_sum_with_given_weights_under_jit():
    mods = linears(3)
    x = rand_x()
    w = jax.nn.softmax(rand_x(1, (3, 5, 3)), -1)
    mix = Mixture(mods)
    out = nnx.jit(lambda m, x, w: m(x, weights=w))(mix, x, w)
    ref = sum(np.asarray(w[..., e : e + 1]) * np_linear(mods[e], x) for e in range(3))
    close(out.output, ref)
    close(out.expert_load, np.asarray(w).reshape(-1, 3).sum(0) / 15.0)


def test_weighted_sum_with_router_matches_manual_and_trains():
    mods = linears(4)
    router = Router(D, 4, k=2, rngs=nnx.Rngs(7))
    mix = Mixture(mods, router)
    x = rand_x(2)

    def loss(m):
        o = m(x)
        return (o.output**2).mean() + o.aux_losses["load_balancing"], o

    @nnx.jit
    def run(m):
        (_, out), grads = nnx.value_and_grad(loss, has_aux=True)(m)
        return out, grads, m.router(x).routing.dense_weights()

    out, grads, w = run(mix)
    w = np.asarray(w)
    assert np.all((w > 0).sum(-1) == 2)  # top-2: two modules per token
    ref = sum(w[..., e : e + 1] * np_linear(mods[e], x) for e in range(4))
    close(out.output, ref)
    assert set(out.aux_losses) == {"load_balancing", "z_loss"}
    assert np.abs(np.asarray(grads["router"]["kernel"][...])).sum() > 0
    assert np.abs(np.asarray(grads["modules"][0]["kernel"][...])).sum() > 0


def test_task_ids_and_routing_sources():
    mods = linears(3)
    mix = Mixture(mods)
    x = rand_x(3)
    ids = jnp.array([2, 0, 1])
    routing = jax.jit(R.top_k_routing, static_argnums=1)(rand_x(4, (3, 5, 3)), 1)
    out, got = nnx.jit(lambda m, x, r: (m(x, task_ids=ids).output, m(x, routing=r).output))(
        mix, x, routing
    )
    for b in range(3):
        close(out[b], np_linear(mods[int(ids[b])], x[b]))
    w = np.asarray(routing.dense_weights())
    close(got, sum(w[..., e : e + 1] * np_linear(mods[e], x) for e in range(3)))


def test_dispatch_equals_weighted_sum_for_dropless_and_soft_moe_reference():
    mods = linears(3)
    x = rand_x(5)
    routing = jax.jit(R.top_k_routing, static_argnums=1)(rand_x(6, (3, 5, 3)), 2)
    soft = jax.jit(R.soft_moe_routing)(rand_x(7, (3, 5, 3, 2)))  # 2 slots per module

    @nnx.jit
    def run(dispatch, dense, x, routing, soft):
        return dispatch(x, routing=routing), dense(x, routing=routing), dispatch(x, routing=soft)

    a, b, got = run(Mixture(mods, aggregator="dispatch"), Mixture(mods), x, routing, soft)
    close(a.output, b.output)
    got = got.output
    # capacity 1 per module and group: dropped assignments contribute nothing either way
    capped = jax.jit(lambda lg: R.top_k_routing(lg, 2, capacity_factor=0.3))(rand_x(8, (3, 5, 3)))
    assert not bool(capped.kept.all())
    a, b, _ = run(Mixture(mods, aggregator="dispatch"), Mixture(mods), x, capped, soft)
    close(a.output, b.output)
    slots = np.einsum("btec,btd->becd", soft.dispatch, x)
    ys = np.stack([np_linear(mods[e], slots[:, e]) for e in range(3)], 1)
    close(got, np.einsum("btec,becd->btd", soft.combine, ys))


def test_smear_one_hot_equals_that_module_and_soft_equals_merged_params():
    mods = linears(3)
    mix = Mixture(mods, aggregator="smear")
    x = rand_x(8)
    ids = jnp.array([1, 1, 2])
    out = nnx.jit(lambda m, x, i: m(x, task_ids=i))(mix, x, ids).output
    for b in range(3):
        close(out[b], mods[int(ids[b])](x[b]))
    w = jnp.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    out = mix(x, weights=w).output
    for b in range(3):
        k = sum(float(w[b, e]) * np.asarray(mods[e].kernel[...]) for e in range(3))
        bias = sum(float(w[b, e]) * np.asarray(mods[e].bias[...]) for e in range(3))
        close(out[b], np.asarray(x[b]) @ k + bias)
    # token weights [B, T, E] are averaged over the sequence: constant rows change nothing
    close(mix(x, weights=jnp.broadcast_to(w[:, None], (3, 5, 3))).output, out)


def test_smear_gradient_reaches_only_selected_module():
    mix = Mixture(linears(3), aggregator="smear")
    x = rand_x(9)
    grads = nnx.grad(lambda m: (m(x, task_ids=jnp.array([0, 0, 2])).output ** 2).sum())(mix)
    norms = [float(jnp.abs(grads["modules"][e]["kernel"][...]).sum()) for e in range(3)]
    assert norms[0] > 0 and norms[2] > 0 and norms[1] == 0


def test_mixture_of_lora_modules_smear_and_batch_split():
    def lora(i):
        m = LoRA(nnx.Linear(D, D, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(10 + i))
        m.lora_b[...] = jax.random.normal(jax.random.key(i), m.lora_b[...].shape)
        return m

    loras = [lora(i) for i in range(3)]
    x = rand_x(10)
    ids = jnp.array([2, 0, 1])
    smear = Mixture(loras, aggregator="smear")(x, task_ids=ids).output
    split = BatchSplit(loras)(x, ids=ids)
    for b in range(3):
        close(smear[b], loras[int(ids[b])](x[b]))
        close(split[b], loras[int(ids[b])](x[b]))


def test_mixture_of_adapters_layer_and_model_block():
    from modjax.models.blocks import Block, FFNSpec

    layer = MixtureOfAdapters(
        D, num_modules=3, bottleneck_dim=2, k=2, init_std=0.5, rngs=nnx.Rngs(0)
    )
    for a in layer.modules:
        a.up[...] = jax.random.normal(jax.random.key(1), a.up[...].shape)
    x = rand_x(11)
    out, w, ys = nnx.jit(
        lambda m, x: (m(x), m.router(x).routing.dense_weights(), [a(x) for a in m.modules])
    )(layer, x)
    w = np.asarray(w)
    close(out.output, sum(w[..., e : e + 1] * np.asarray(ys[e]) for e in range(3)))
    assert out.expert_load.shape == (3,)
    smear = MixtureOfAdapters(D, num_modules=3, bottleneck_dim=2, aggregator="smear",
                              init_std=0.5, rngs=nnx.Rngs(0))  # fmt: skip
    for e, a in enumerate(smear.modules):
        a.up[...] = jax.random.normal(jax.random.key(e), a.up[...].shape)
    out, w = nnx.jit(lambda m, x: (m(x), m.router(x).routing.dense_weights()))(smear, x)
    w = np.asarray(w).mean(1)  # [B, E]: SMEAR merges once per sequence
    for b in range(3):
        p = {n: sum(w[b, e] * np.asarray(getattr(smear.modules[e], n)[...]) for e in range(3))
             for n in ("down", "down_bias", "up", "up_bias")}  # fmt: skip
        h = np.maximum(np.asarray(x[b]) @ p["down"] + p["down_bias"], 0.0)
        close(out.output[b], h @ p["up"] + p["up_bias"])
    spec = FFNSpec(d_ff=8, sparse="mixture", placement="all", sparse_kwargs={"num_modules": 2})
    block = Block(D, "mixture", spec, attention=None, rngs=nnx.Rngs(1))
    y, aux = nnx.jit(lambda blk, x: blk(x))(block, x)
    assert y.shape == x.shape and "load_balancing" in aux["aux_losses"]
    assert aux["expert_load"].shape == (2,)


# ---------------------------------------------------------------------- bad input


def test_bad_input():
    mods = linears(3)
    x = rand_x()
    with pytest.raises(ValueError, match=r"aggregator must be one of \['dispatch', 'smear', "):
        Mixture(mods, aggregator="attention")
    assert sorted(AGGREGATORS) == ["dispatch", "smear", "weighted_sum"]
    with pytest.raises(ValueError, match="num_experts=4, but 3 modules"):
        Mixture(mods, Router(D, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"one weight per module \(E = 3\).*\(3, 5, 2\)"):
        Mixture(mods)(x, weights=jnp.ones((3, 5, 2)))
    soft = R.soft_moe_routing(jnp.zeros((3, 4, 3, 1)))
    with pytest.raises(ValueError, match=r"dispatch .* = \(3, 4, 3, 1\) does not match"):
        Mixture(mods, aggregator="dispatch")(x, routing=soft)
    with pytest.raises(ValueError, match=r"task_ids must be in \[0, 3\), got values \[-1\]"):
        Mixture(mods)(x, task_ids=jnp.array([0, -1, 2]))
    with pytest.raises(ValueError, match="pass routing=, weights= or task_ids="):
        Mixture(mods)(x)
    with pytest.raises(ValueError, match=r"modules\[1\] \(Linear\) differs"):
        Mixture([mods[0], nnx.Linear(D, 3, rngs=nnx.Rngs(0))], aggregator="smear")
    with pytest.raises(ValueError, match=r"needs nnx.Module modules; modules\[1\] is a function"):
        Mixture([mods[0], lambda x: x], aggregator="smear")


def test_merge_modules_with_parameter_aggregators():
    from modjax.aggregation import task_arithmetic, task_vector, ties_merge, weighted_average

    a, b = linears(2)
    x = rand_x(19)
    pick = merge_modules([a, b], lambda ps: weighted_average(ps, jnp.array([0.0, 1.0])))
    close(pick(x), b(x))
    half = merge_modules(
        [a, b], lambda ps: task_arithmetic(ps[0], [task_vector(ps[1], ps[0])], 0.5)
    )
    close(half(x), Average([a, b], space="parameter")(x))
    ties = merge_modules([a, b], lambda ps: ties_merge(ps, density=1.0))
    k_a, k_b = np.asarray(a.kernel[...]), np.asarray(b.kernel[...])
    agree = np.sign(k_a) == np.sign(k_b)
    ref = np.where(agree, (k_a + k_b) / 2, np.where(np.abs(k_a) > np.abs(k_b), k_a, k_b))
    close(ties.kernel[...], ref)
    assert isinstance(ties, nnx.Linear) and a.kernel[...] is not ties.kernel[...]
    with pytest.raises(ValueError, match=r"\[state, merge\(states\)\]\[1\] has a different"):
        merge_modules([a, b], lambda ps: ps[0][:1])
