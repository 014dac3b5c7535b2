"""Mesh, logical axis rules, and parameter/batch shardings on 8 simulated devices."""

import jax
import numpy as np
import pytest
from flax import nnx

from modjax.models import TransformerConfig, TransformerLM
from modjax.sharding import (
    batch_sharding,
    logical_to_spec,
    make_mesh,
    shard_activation,
    state_shardings,
)


def test_make_mesh_sizes_and_errors():
    mesh = make_mesh(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert make_mesh(devices=jax.devices()[:2]).devices.size == 2
    with pytest.raises(ValueError, match="at most one"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh(data=3, fsdp=2)
    with pytest.raises(ValueError, match="'tensor'"):
        make_mesh(tensor=0)


def test_logical_to_spec_rules():
    mesh = make_mesh(data=2, fsdp=2, expert=2)
    assert logical_to_spec(("embed", "mlp")) == jax.P("fsdp", "tensor")
    assert logical_to_spec(("embed", "mlp"), mesh=mesh) == jax.P("fsdp", None)
    assert logical_to_spec(("batch", "length"), mesh=mesh) == jax.P(
        ("data", "fsdp", "expert"), None
    )
    # a mesh axis is used once per array
    assert logical_to_spec(("expert", "batch"), mesh=mesh) == jax.P("expert", ("data", "fsdp"))
    with pytest.raises(ValueError, match="unknown logical axis 'embd'"):
        logical_to_spec(("embd",))


def test_state_shardings_follow_logical_axes():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cfg = TransformerConfig(vocab_size=30, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    model = nnx.eval_shape(lambda: TransformerLM(cfg, rngs=nnx.Rngs(0)))
    sh = state_shardings(nnx.state(model, nnx.Param), mesh)
    block = sh["blocks"][0]
    assert block["attention"]["query"]["kernel"].spec == jax.P("fsdp", "tensor")
    assert block["ffn"]["wo"].spec == jax.P("tensor", "fsdp")
    assert block["ffn_norm"]["scale"].spec == jax.P(None)
    # the vocab axis is split over tensor when it divides
    assert sh["embed"]["embedding"].spec == jax.P("tensor", "fsdp")
    odd = TransformerConfig(vocab_size=31, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    model = nnx.eval_shape(lambda: TransformerLM(odd, rngs=nnx.Rngs(0)))
    sh = state_shardings(nnx.state(model, nnx.Param), mesh)
    assert sh["embed"]["embedding"].spec == jax.P(None, "fsdp")  # 31 does not divide


def test_batch_sharding_and_activation_constraint():
    mesh = make_mesh(data=4, tensor=2)
    s = batch_sharding(mesh, 3)
    assert s.spec == jax.P("data", None, None)
    x = jax.device_put(np.ones((8, 4, 6), np.float32), s)

    @jax.jit
    def f(x):
        return shard_activation(x * 2, ("batch", "length", "mlp"))

    with jax.set_mesh(mesh):
        y = f(x)
    assert y.sharding.spec == jax.P("data", None, "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2.0)
