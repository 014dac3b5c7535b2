"""MoE layer: every strategy vs a per-expert loop reference built from the same router
decision, values and gradients (inputs, router and expert weights), shared experts,
dtypes, variable tags and bad input."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modjax.computation import ffn as F
from modjax.layers.moe import ExpertParam, MoE, MoEOutput

GPU = os.environ.get("MODJAX_GPU_TESTS") == "1"
# float32 checks: on GPU, f32 dots run in TF32 by default (~1e-3 relative error).
F32 = dict(rtol=5e-3, atol=5e-3) if GPU else None


def reference_forward(moe: MoE, x, train=False):
    """The same layer computed by the slow twin: every expert on every token, masked."""
    routed = moe.router(x, train=train)
    r = routed.routing
    t, d = x.shape[-2:]
    flat = jax.tree.map(lambda a: a.reshape(-1, a.shape[-1]), r)
    y = F.moe_ffn_reference(
        x.reshape(-1, d).astype(jnp.float32),
        flat,
        {n: v.astype(jnp.float32) for n, v in moe.expert_params().items()},
        activation=moe.activation,
    )
    y = y.reshape(x.shape)
    if moe.shared is not None:
        y = y + moe.shared(x.astype(jnp.float32))
    return y


def _grads(fn, moe, x):
    def loss(model, x):
        return jnp.sum(fn(model, x).astype(jnp.float32) ** 2)

    return nnx.grad(loss, argnums=(0, 1))(moe, x)


@pytest.mark.parametrize("strategy", ["dropless", "capacity", "einsum"])
@pytest.mark.parametrize(
    "k,shared,activation", [(1, 0, "swiglu"), (2, 1, "gelu"), (4, 2, "swiglu")]
)
def test_moe_matches_reference(strategy, k, shared, activation):
    moe = MoE(
        24, num_experts=6, d_ff=40, k=k, activation=activation, num_shared_experts=shared,
        shared_d_ff=16, strategy=strategy, impl="xla", block_size=16, rngs=nnx.Rngs(k),
    )  # fmt: skip
    x = jax.random.normal(jax.random.PRNGKey(k), (2, 19, 24), jnp.float32)
    out = moe(x)
    assert isinstance(out, MoEOutput)
    assert out.output.shape == x.shape
    assert set(out.aux_losses) >= {"load_balancing"}
    assert out.expert_load.shape == (6,)
    np.testing.assert_allclose(float(out.expert_load.sum()), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        out.output, reference_forward(moe, x), **(F32 or dict(rtol=2e-4, atol=2e-4))
    )

    g_fast = _grads(lambda m, x: m(x).output, moe, x)
    g_ref = _grads(reference_forward, moe, x)
    leaves_f, leaves_r = jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)
    assert len(leaves_f) == len(leaves_r)
    for a, b in zip(leaves_f, leaves_r):
        scale = max(float(jnp.abs(b).max()), 1e-6)
        np.testing.assert_allclose(a / scale, b / scale, **(F32 or dict(rtol=2e-4, atol=2e-4)))
    # The router's weights do get a gradient through the combine weights.
    assert float(jnp.abs(g_fast[0].router.kernel[...]).max()) > 0


def test_dropping_with_capacity_factor():
    kw = dict(num_experts=4, d_ff=16, k=2, capacity_factor=0.5, block_size=16, impl="xla")
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 32, 8))
    outs = {}
    for s in ("capacity", "einsum", "dropless"):
        moe = MoE(8, strategy=s, rngs=nnx.Rngs(0), **kw)
        outs[s] = moe(x)
    assert float(outs["capacity"].metrics["dropped_fraction"]) > 0
    np.testing.assert_allclose(
        outs["capacity"].output, outs["einsum"].output, **(F32 or dict(atol=1e-5))
    )
    # dropless computes exactly the kept assignments (weight 0 elsewhere): same result
    np.testing.assert_allclose(
        outs["dropless"].output, outs["einsum"].output, **(F32 or dict(atol=1e-5))
    )
    np.testing.assert_allclose(
        outs["capacity"].output, reference_forward(moe, x), **(F32 or dict(atol=1e-5))
    )


def test_expert_params_are_tagged_and_dtyped():
    moe = MoE(
        16, num_experts=4, d_ff=32, k=2, dtype=jnp.bfloat16, param_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    experts = nnx.state(moe, ExpertParam)
    leaves = jax.tree.leaves(experts)
    assert len(leaves) == 3 and all(v.shape[0] == 4 for v in leaves)
    assert moe.wi_gate.get_metadata()["logical_axes"] == ("expert", "embed", "expert_mlp")
    assert moe.wo.get_metadata()["logical_axes"] == ("expert", "expert_mlp", "embed")
    assert moe.wo[...].dtype == jnp.float32
    out = moe(jnp.ones((2, 8, 16), jnp.bfloat16))
    assert out.output.dtype == jnp.bfloat16
    # The router runs in float32 whatever the activation dtype.
    assert out.aux_losses["load_balancing"].dtype == jnp.float32


def test_dense_routing_router():
    moe = MoE(8, num_experts=4, d_ff=16, k=1, router_strategy="soft_moe", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 8))
    out = moe(x)
    r = moe.router(x).routing
    params = moe.expert_params()
    want = jax.vmap(
        lambda xs, dsp, cmb: (
            F._batched_expert_ffn(jnp.einsum("tec,td->ecd", dsp, xs), params, "swiglu")
            .reshape(-1, 8)
            .T.dot(cmb.reshape(6, -1).T)
            .T
        )
    )(x, r.dispatch, r.combine)
    np.testing.assert_allclose(out.output, want, **(F32 or dict(rtol=1e-4, atol=1e-5)))


def test_bad_arguments_raise():
    with pytest.raises(
        ValueError, match=r"k must be an int in \[1, min\(8, num_experts=4\)\], got 5"
    ):
        MoE(8, num_experts=4, d_ff=16, k=5, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"k must be an int in \[1, min\(8, num_experts=16\)\], got 9"
    ):
        MoE(8, num_experts=16, d_ff=16, k=9, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="strategy must be one of"):
        MoE(8, num_experts=4, d_ff=16, strategy="sorted", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="impl must be one of"):
        MoE(8, num_experts=4, d_ff=16, impl="triton", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        MoE(8, num_experts=4, d_ff=16, dtype=jnp.int8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="activation must be one of"):
        MoE(8, num_experts=4, d_ff=16, activation="tanh", rngs=nnx.Rngs(0))
    moe = MoE(8, num_experts=4, d_ff=16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x must be \[..., T, D=8\], got shape \(2, 3, 7\)"):
        moe(jnp.ones((2, 3, 7)))


@pytest.mark.skipif(not GPU, reason="GPU bf16 check (MODJAX_GPU_TESTS=1)")
def test_moe_gpu_bf16_pallas_vs_reference():
    moe = MoE(
        256, num_experts=8, d_ff=512, k=2, num_shared_experts=1, dtype=jnp.bfloat16,
        impl="pallas", rngs=nnx.Rngs(0),
    )  # fmt: skip
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 300, 256), jnp.bfloat16)
    y = np.float32(jax.jit(lambda m, x: m(x).output)(moe, x))
    ref = np.float32(reference_forward(moe, x))
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-2
    ga = _grads(lambda m, x: m(x).output, moe, x)
    gb = _grads(reference_forward, moe, x)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        a, b = np.float32(a), np.float32(b)
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b) + 1e-6
