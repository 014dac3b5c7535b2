"""A tiny MoE model trained on different meshes: the mesh picks the expert-parallel path,
the model code does not change, and the losses equal one device's.

Also a checkpoint saved on (data=2, expert=4) restored onto (expert=2). The model and the
SGD step are local to this test (the project trainer is tested in tests/train).
Tolerance: float32, losses and parameters to rtol = atol = 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from modjax.parallel import (
    expert_parallel_apply,
    expert_parallel_reference,
    make_ffn_expert_fn,
    use_expert_parallel,
)
from modjax.routing.types import Routing
from modjax.sharding import logical_to_spec, make_mesh, shard_activation

B, L, D, F, E, K = 8, 4, 8, 16, 8, 2
TOL = dict(rtol=1e-5, atol=1e-5)


_PATHS_TRACED: list[str] = []


class _ExpertParam(nnx.Param):
    pass


class _TinyMoE(nnx.Module):
    """x -> x + MoE(x) -> head; the MoE dispatches on the mesh, nothing else changes."""

    def __init__(self, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.3)
        self.router = nnx.Param(init(rngs.params(), (D, E)), logical_axes=("embed", None))
        self.w_in = _ExpertParam(
            init(rngs.params(), (E, D, F)), logical_axes=("expert", "embed", "expert_mlp")
        )
        self.w_out = _ExpertParam(
            init(rngs.params(), (E, F, D)), logical_axes=("expert", "expert_mlp", "embed")
        )
        self.head = nnx.Param(init(rngs.params(), (D, 1)), logical_axes=("embed", None))

    def __call__(self, x):
        b, l, d = x.shape
        tokens = shard_activation(x.reshape(b * l, d), ("batch", "embed"))
        probs = jax.nn.softmax(tokens @ self.router[...], axis=-1)
        weight, index = jax.lax.top_k(probs, K)
        routing = Routing(
            index.astype(jnp.int32), weight, jnp.ones(index.shape, bool),
            jnp.zeros(index.shape, jnp.int32), probs, E,
        )  # fmt: skip
        params = {"w_in": self.w_in[...], "w_out": self.w_out[...]}
        fn = make_ffn_expert_fn()
        if use_expert_parallel():
            _PATHS_TRACED.append("expert_parallel")
            y, _ = expert_parallel_apply(tokens, routing, fn, params)
        else:
            _PATHS_TRACED.append("local")
            y = expert_parallel_reference(tokens, routing, fn, params)
        return ((tokens + y) @ self.head[...]).reshape(b, l)


def _shardings(state, mesh):
    def one(v):
        spec = logical_to_spec(v.get_metadata().get("logical_axes"), mesh=mesh)
        return jax.NamedSharding(mesh, spec)

    return jax.tree.map(one, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def _data():
    ks = jax.random.split(jax.random.key(1), 2)
    return jax.random.normal(ks[0], (B, L, D)), jax.random.normal(ks[1], (B, L))


@jax.jit
def _step(state, x, target):
    graphdef = nnx.graphdef(_TinyMoE(nnx.Rngs(0)))

    def loss_fn(state):
        return jnp.mean((nnx.merge(graphdef, state)(x) - target) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(state)
    return jax.tree.map(lambda p, g: p - 0.05 * g, state, grads), loss


def _train(state, steps, mesh=None):
    x, target = _data()
    losses = []
    if mesh is None:
        for _ in range(steps):
            state, loss = _step(state, x, target)
            losses.append(float(loss))
        return state, losses
    with jax.set_mesh(mesh):
        state = jax.device_put(state, _shardings(state, mesh))
        batch = jax.NamedSharding(mesh, logical_to_spec(("batch", None, None), mesh=mesh))
        x = jax.device_put(x, batch)
        for _ in range(steps):
            state, loss = _step(state, x, target)
            losses.append(float(loss))
    return state, losses


def _init_state():
    return nnx.state(_TinyMoE(nnx.Rngs(0)))


@pytest.fixture(scope="module")
def one_device_run():
    return _train(_init_state(), 4)


@pytest.mark.parametrize("mesh_shape", [dict(data=2, expert=4), dict(data=8)], ids=str)
def test_train_steps_match_one_device(mesh_shape, one_device_run):
    mesh = make_mesh(**mesh_shape)
    _PATHS_TRACED.clear()
    state, losses = _train(_init_state(), 4, mesh)
    assert _PATHS_TRACED == ["expert_parallel" if mesh.shape["expert"] > 1 else "local"]
    ref_state, ref_losses = one_device_run
    np.testing.assert_allclose(losses, ref_losses, **TOL)
    assert ref_losses[-1] < ref_losses[0]  # it does train
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
    if mesh.shape["expert"] > 1:
        assert state["w_in"][...].sharding.spec[0] == "expert"


def test_checkpoint_saved_on_data2_expert4_restores_onto_expert2(tmp_path, one_device_run):
    mesh_a = make_mesh(data=2, expert=4)
    state, _ = _train(_init_state(), 2, mesh_a)
    path = tmp_path / "ckpt"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, nnx.to_pure_dict(state))
    mesh_b = make_mesh(data=1, expert=2, devices=jax.devices()[:2])
    target = _init_state()
    shardings = nnx.to_pure_dict(_shardings(target, mesh_b))
    abstract = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(target),
        shardings,
    )
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path, abstract)
    assert restored["w_in"].sharding.spec[0] == "expert"
    assert len(restored["w_in"].sharding.device_set) == 2
    nnx.replace_by_pure_dict(target, restored)
    _, losses = _train(target, 2, mesh_b)
    np.testing.assert_allclose(losses, one_device_run[1][2:], **TOL)
