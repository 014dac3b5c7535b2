"""The MoE layer takes the expert-parallel path when the mesh has an expert axis, and its
outputs and gradients (input, router kernel, expert weights) equal the meshless layer's.

Tolerance: float32, rtol = atol = 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modjax.layers.moe import MoE
from modjax.sharding import make_mesh

TOL = dict(rtol=1e-5, atol=1e-5)


def _setup():
    moe = MoE(16, num_experts=8, d_ff=32, k=2, block_size=8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 16, 16))
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)

    def loss(params, x):
        out = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(jnp.sin(out.output) * out.output), out.metrics

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)), params, x


@pytest.mark.parametrize("mesh_shape", [dict(data=2, expert=4)], ids=str)
def test_moe_layer_expert_parallel_equals_meshless(mesh_shape):
    step, params, x = _setup()
    (l_ref, m_ref), g_ref = step(params, x)
    assert "ep_overflow" not in m_ref
    with jax.set_mesh(make_mesh(**mesh_shape)):
        (l, m), g = step(params, x)
    assert float(m["ep_overflow"]) == 0.0  # the expert-parallel path ran, dropless
    np.testing.assert_allclose(float(l), float(l_ref), **TOL)
    flat, flat_ref = jax.tree.leaves(g), jax.tree.leaves(g_ref)
    assert len(flat) == 5  # router kernel, wi_gate, wi_up, wo; and x
    for a, b in zip(flat, flat_ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
    assert float(jnp.abs(g[0]["router"]["kernel"][...]).sum()) > 0


def test_moe_layer_ep_capacity_factor_bounds_the_buffer_and_counts_overflow():
    """A tiny ep_capacity_factor overflows (counted, never silent); a large one does not."""
    x = jax.random.normal(jax.random.key(1), (4, 16, 16))
    # Route every token to expert 0 (one device pair takes all the load).
    skew = jnp.zeros((16, 8)).at[:, 0].set(10.0).at[:, 1].set(5.0)
    mesh = make_mesh(data=2, expert=4)
    results = {}
    for factor in (0.25, 8.0):
        moe = MoE(
            16, num_experts=8, d_ff=32, k=2, block_size=8, ep_capacity_factor=factor,
            rngs=nnx.Rngs(0),
        )  # fmt: skip
        moe.router.kernel[...] = skew
        with jax.set_mesh(mesh):
            out = nnx.jit(lambda m, x: m(x))(moe, x)
        results[factor] = (float(out.metrics["ep_overflow"]), out.metrics["ep_max_pair_load"])
    assert results[0.25][0] > 0
    assert results[8.0][0] == 0.0
    assert float(results[8.0][1]) > 0
    with pytest.raises(ValueError, match="ep_capacity_factor"):
        MoE(16, num_experts=8, d_ff=32, ep_capacity_factor=0.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="ep_overflow"):
        MoE(16, num_experts=8, d_ff=32, ep_overflow="drop", rngs=nnx.Rngs(0))
