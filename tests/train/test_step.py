"""Train step on a mesh: loss falls, parameters stay sharded, non-finite updates are
skipped and counted, aux losses need weights, router biases move toward balance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from modjax.models import MLP, MLPConfig
from modjax.sharding import make_mesh
from modjax.train.loop import global_batch
from modjax.train.optim import OptimizerConfig, make_optimizer, param_labels
from modjax.train.step import (
    TaskConfig,
    classification_loss,
    init_train_state,
    make_train_step,
    router_bias_mask,
    update_router_biases,
    weighted_aux_loss,
)

WEIGHTS = {"load_balancing": 0.01, "z_loss": 0.001}


def _setup(mesh, *, aux_loss_free=False, weights=WEIGHTS, bias_rate=0.0):
    sparse = dict(num_experts=4, k=1, strategy="einsum", aux_loss_free=aux_loss_free)
    cfg = MLPConfig(in_features=8, num_classes=4, d_model=16, d_ff=32, num_layers=2,
                    ffn="moe", sparse_kwargs=sparse)  # fmt: skip
    opt = OptimizerConfig(learning_rate=1e-2)
    model_fn = lambda: MLP(cfg, rngs=nnx.Rngs(0))
    holder = {}

    def tx_fn(p):
        holder["labels"] = param_labels(p, opt)
        return make_optimizer(opt, holder["labels"])

    graphdef, state, tx, sh = init_train_state(model_fn, tx_fn, mesh)
    _, _, abs_rest = nnx.split(nnx.eval_shape(model_fn), nnx.Param, ...)
    task = TaskConfig(name="classification", input_key="x", target_key="y",
                      aux_loss_weights=weights)  # fmt: skip
    mask = router_bias_mask(abs_rest)
    step = make_train_step(
        graphdef, tx, task, labels=holder["labels"], bias_mask=mask, bias_update_rate=bias_rate
    )
    return state, jax.jit(step, donate_argnums=0, out_shardings=(sh, None)), sh


def _batch(mesh, n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    y = (x[:, :4].argmax(-1)).astype(np.int32)
    return global_batch({"x": x, "y": y}, mesh)


def test_loss_falls_sharded_nonfinite_skipped_and_biases_balance():
    # one compiled step (aux-loss-free routers on a 2x2x2 mesh) serves every check
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    state, step, sh = _setup(mesh, aux_loss_free=True, bias_rate=0.05)
    biases = lambda st: [v for v in jax.tree.leaves(st.rest) if v.dtype == jnp.float32]
    assert len(biases(state)) == 2 and all(float(jnp.abs(b).sum()) == 0 for b in biases(state))
    with jax.set_mesh(mesh):
        batch = _batch(mesh)
        losses = []
        for _ in range(15):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        assert losses[-1] < 0.7 * losses[0]
        assert all(float(jnp.abs(b).sum()) > 0 for b in biases(state))
        assert {"aux/load_balancing", "aux/z_loss", "accuracy"} <= set(m)
        assert m["expert_load"].shape == (2, 4)
        kernel = state.params["input"]["kernel"]
        assert kernel.sharding.spec == sh.params["input"]["kernel"].spec
        assert kernel.sharding.spec == jax.P(None, "fsdp")
        before = jax.tree.map(np.asarray, (state.params, biases(state), state.opt_state))
        bad = dict(batch)
        bad["x"] = batch["x"].at[0, 0].set(jnp.nan)
        state, m = step(state, bad)
        assert float(m["nonfinite"]) == 1.0 and int(state.skipped) == 1
        assert int(state.step) == 16
        after = jax.tree.map(np.asarray, (state.params, biases(state), state.opt_state))
        jax.tree.map(np.testing.assert_array_equal, before, after)  # router biases too
        state, m = step(state, batch)
        assert float(m["nonfinite"]) == 0.0 and int(state.skipped) == 1


def test_bias_rate_needs_router_biases_and_batch_keys_are_named():
    task = TaskConfig(name="classification", input_key="x", target_key="y")
    with pytest.raises(ValueError, match=r"bias_update_rate=0.1 .*no router bias"):
        make_train_step(None, None, task, labels={}, bias_mask={"a": False}, bias_update_rate=0.1)
    with pytest.raises(ValueError, match=r"bias_update_rate must be >= 0, got -1"):
        make_train_step(None, None, task, labels={}, bias_mask={}, bias_update_rate=-1.0)
    model = lambda x, train: (x, {})
    with pytest.raises(ValueError, match=r"task.target_key='y' is not a batch key.*\['x'\]"):
        classification_loss(model, {"x": jnp.zeros((2, 3))}, task)
    with pytest.raises(ValueError, match=r"task.context\['task_ids'\]='t'"):
        classification_loss(model, {"x": 0}, dataclasses.replace(task, context={"task_ids": "t"}))


def test_aux_loss_weights_must_match():
    with pytest.raises(ValueError, match="missing.*z_loss"):
        weighted_aux_loss({"z_loss": 1.0, "load_balancing": 1.0}, {"load_balancing": 1.0})
    with pytest.raises(ValueError, match="unknown.*lb"):
        weighted_aux_loss({"z_loss": 1.0}, {"z_loss": 1.0, "lb": 1.0})
    assert float(weighted_aux_loss({"a": 2.0, "b": 3.0}, {"a": 0.5, "b": 0.0})) == 1.0


def test_router_bias_update_outside_optimizer():
    rest = {"a": {"bias": jnp.zeros(3)}, "b": {"other": jnp.ones(2)}, "c": {"bias": jnp.zeros(3)}}
    mask = {"a": {"bias": True}, "b": {"other": False}, "c": {"bias": True}}
    load = jnp.array([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]])
    out = update_router_biases(rest, mask, load, 0.1)
    np.testing.assert_allclose(out["a"]["bias"], [-0.1, 0.1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(out["c"]["bias"], 0.0, atol=1e-6)
    np.testing.assert_array_equal(out["b"]["other"], 1.0)
    with pytest.raises(ValueError, match=r"2 router biases but expert_load has shape \(1, 3\)"):
        update_router_biases(rest, mask, load[:1], 0.1)


def test_host_init_equals_mesh_init_values_and_shardings():
    # host init (the GPU default) and init on the mesh give the same sharded state
    cfg = MLPConfig(in_features=8, num_classes=4, d_model=16, d_ff=32, num_layers=2,
                    ffn="moe", sparse_kwargs=dict(num_experts=4, k=2))  # fmt: skip
    model_fn = lambda: MLP(cfg, rngs=nnx.Rngs(3))
    opt = OptimizerConfig(learning_rate=1e-2)
    tx_fn = lambda p: make_optimizer(opt, param_labels(p, opt))
    mesh = make_mesh(data=2, expert=4)
    _, host, _, host_sh = init_train_state(model_fn, tx_fn, mesh, host_init=True)
    _, dev, _, dev_sh = init_train_state(model_fn, tx_fn, mesh, host_init=False)
    assert jax.tree.structure(host) == jax.tree.structure(dev)
    assert jax.tree.leaves(host_sh) == jax.tree.leaves(dev_sh)
    expert_axis = 0
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(dev)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        expert_axis += "expert" in str(a.sharding.spec)
    assert expert_axis > 0  # the check covered expert-sharded weights


def test_host_init_without_cpu_backend_says_how_to_fix(monkeypatch):
    import modjax.train.step as step_mod

    monkeypatch.setattr(step_mod, "_has_cpu_backend", lambda: False)
    cfg = MLPConfig(in_features=4, num_classes=2, d_model=8, d_ff=8, num_layers=1)
    opt = OptimizerConfig(learning_rate=1e-2)
    tx_fn = lambda p: make_optimizer(opt, param_labels(p, opt))
    with pytest.raises(RuntimeError, match="JAX_PLATFORMS.*host_init=False"):
        init_train_state(lambda: MLP(cfg, rngs=nnx.Rngs(0)), tx_fn, make_mesh(), host_init=True)


def test_trainer_with_remat_and_router_jitter_matches_plain():
    # the trainer's step (pure-dict state merged inside jax.grad) with checkpointed
    # blocks and RNG-drawing routers: same losses and RNG state as without remat
    from modjax.models import TransformerConfig, TransformerLM

    def run(remat):
        cfg = TransformerConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64,
                                ffn="moe", sparse_kwargs=dict(num_experts=4, k=2, jitter=0.1),
                                remat=remat)  # fmt: skip
        opt = OptimizerConfig(learning_rate=1e-3)
        holder = {}

        def tx_fn(p):
            holder["labels"] = param_labels(p, opt)
            return make_optimizer(opt, holder["labels"])

        mesh = make_mesh()
        model_fn = lambda: TransformerLM(cfg, rngs=nnx.Rngs(0))
        graphdef, state, tx, _ = init_train_state(model_fn, tx_fn, mesh)
        task = TaskConfig(name="lm", target_key="", aux_loss_weights=WEIGHTS)
        step = jax.jit(make_train_step(graphdef, tx, task, labels=holder["labels"], bias_mask={}))
        tokens = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
        batch = global_batch({"inputs": tokens}, mesh)
        losses = []
        with jax.set_mesh(mesh):
            for _ in range(3):
                state, m = step(state, batch)
                losses.append(float(m["loss"]))
        keys_as_data = lambda x: jax.random.key_data(x) if _is_key(x) else x
        return losses, jax.tree.leaves(jax.tree.map(keys_as_data, state.rest))

    def _is_key(x):
        return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)

    plain, plain_rest = run("none")
    remat, remat_rest = run("full")
    np.testing.assert_allclose(remat, plain, rtol=1e-6)
    assert plain[-1] < plain[0]
    for a, b in zip(remat_rest, plain_rest):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_equals_optax_values_grads_and_argmax_accuracy(dtype):
    from modjax.train.step import _cross_entropy

    k1, k2, k3 = jax.random.split(jax.random.key(7), 3)
    logits = (4.0 * jax.random.normal(k1, (3, 5, 37))).astype(dtype)
    targets = jax.random.randint(k2, (3, 5), 0, 37)
    targets = targets.at[0, :2].set(jnp.argmax(logits[0, :2], -1))  # some correct ones
    mask = (jax.random.uniform(k3, (3, 5)) > 0.3).astype(jnp.float32).at[0, :2].set(1.0)

    def reference(lg):
        lg = lg.astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(lg, targets)
        correct = (jnp.argmax(lg, -1) == targets).astype(jnp.float32)
        return (loss * mask).sum() / mask.sum(), (correct * mask).sum() / mask.sum()

    (got, m), g_got = jax.value_and_grad(_cross_entropy, has_aux=True)(logits, targets, mask)
    (want, acc), g_want = jax.value_and_grad(reference, has_aux=True)(logits)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], acc)
    assert float(acc) > 0
    assert g_got.dtype == dtype
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.float32(g_got), np.float32(g_want), atol=tol)
    # a masked-out padding target (-1) adds nothing: no NaN, not counted correct
    padded, pad_mask = targets.at[2].set(-1), mask.at[2].set(0.0)
    loss, m = _cross_entropy(logits, padded, pad_mask)
    want, acc = _cross_entropy(logits[:2], targets[:2], mask[:2])
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], acc["accuracy"])
    acc_all = _cross_entropy(logits, padded, None)[1]["accuracy"]  # 15 positions, 5 padded
    acc_first = _cross_entropy(logits[:2], targets[:2], None)[1]["accuracy"]  # the other 10
    np.testing.assert_allclose(acc_all * 15, acc_first * 10, rtol=1e-6)
