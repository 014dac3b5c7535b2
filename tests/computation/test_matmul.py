"""modjax.computation.matmul: the low-precision einsum equals the explicitly float32-
accumulated one (values and gradients), its gradient matmuls stay in the operands' dtype,
and it stays an ordinary dot under vmap."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.computation import matmul

SPECS = [
    ("td,df->tf", (6, 5), (5, 7)),
    ("ecd,edf->ecf", (3, 4, 5), (3, 5, 6)),
    ("tec,td->ecd", (7, 3, 2), (7, 5)),
    ("tkd,tk->td", (4, 3, 5), (4, 3)),
]


def _inputs(shape_a, shape_b, dtype, seed=0):
    ka, kb, kg = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ka, shape_a).astype(dtype),
            jax.random.normal(kb, shape_b).astype(dtype), kg)  # fmt: skip


@pytest.mark.parametrize("spec,shape_a,shape_b", SPECS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_einsum_equals_reference_values_and_grads(spec, shape_a, shape_b, dtype):
    a, b, kg = _inputs(shape_a, shape_b, dtype)
    out_shape = jax.eval_shape(lambda: matmul.einsum_reference(spec, a, b)).shape
    g = jax.random.normal(kg, out_shape)  # a random cotangent through a float32 loss

    def loss(fn):
        return lambda a, b: jnp.sum(fn(spec, a, b).astype(jnp.float32) * g)

    got, got_grads = jax.value_and_grad(loss(matmul.einsum), (0, 1))(a, b)
    want, want_grads = jax.value_and_grad(loss(matmul.einsum_reference), (0, 1))(a, b)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=5e-2)
    np.testing.assert_allclose(got, want, **tol)
    for x, y, operand in zip(got_grads, want_grads, (a, b)):
        assert x.dtype == operand.dtype
        np.testing.assert_allclose(np.float32(x), np.float32(y), **tol)
    # and against float64 numpy, so that both cannot be wrong the same way
    a64, b64, g64 = (np.asarray(v, np.float64) for v in (a, b, g))
    ins, out = spec.split("->")
    a_spec, b_spec = ins.split(",")
    np.testing.assert_allclose(got, np.sum(np.einsum(spec, a64, b64) * g64), **tol)
    np.testing.assert_allclose(
        np.float32(got_grads[0]), np.einsum(f"{out},{b_spec}->{a_spec}", g64, b64), **tol
    )
    np.testing.assert_allclose(np.float32(got_grads[1]),
                               np.einsum(f"{a_spec},{out}->{b_spec}", a64, g64), **tol)  # fmt: skip


def test_bf16_gradient_matmuls_take_bf16_operands():
    a, b, _ = _inputs((8, 16), (16, 4), jnp.bfloat16)

    def dots(fn):
        jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: fn("td,df->tf", a, b).sum(), (0, 1)))(a, b)
        found = []

        def walk(jp):
            for eqn in jp.eqns:
                if eqn.primitive.name == "dot_general":
                    found.append(tuple(v.aval.dtype for v in eqn.invars))
                for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jaxpr.jaxpr)
        return found

    got = dots(matmul.einsum)
    assert len(got) == 3 and all(d == (jnp.bfloat16, jnp.bfloat16) for d in got), got
    # the plain formulation's gradient multiplies a float32 cotangent: what this avoids
    assert any(jnp.float32 in d for d in dots(matmul.einsum_reference))


def test_dot_matches_einsum_with_leading_axes_and_casts_w():
    x = jax.random.normal(jax.random.key(1), (2, 3, 5)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (5, 4))  # float32 parameter
    y = matmul.dot(x, w)
    assert y.dtype == jnp.bfloat16 and y.shape == (2, 3, 4)
    want = matmul.einsum_reference("abk,kn->abn", x, w.astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.float32(y), np.float32(want))
    assert matmul.dot(x, w, jnp.float32).dtype == jnp.float32
    with pytest.raises(ValueError, match=r"dot: x \(2, 3, 5\) and w \(4, 4\)"):
        matmul.dot(x, w[:4])


def test_mismatched_or_integer_dtypes_are_refused():
    a, b, _ = _inputs((2, 3), (3, 4), jnp.float32)
    with pytest.raises(ValueError, match="share a floating dtype, got a=float32, b=bfloat16"):
        matmul.einsum("td,df->tf", a, b.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="got a=int32, b=int32"):
        matmul.einsum("td,df->tf", a.astype(jnp.int32), b.astype(jnp.int32))


def test_bf16_dot_accumulates_in_float32_on_this_backend():
    # what the module's precision claim rests on: a bf16 dot rounds once, at the end
    x = jax.random.normal(jax.random.key(3), (16, 4096)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(4), (4096, 8)).astype(jnp.bfloat16)
    exact = np.float64(x) @ np.float64(w)
    got = np.float64(matmul.einsum("tk,kn->tn", x, w))
    rounded = np.float64(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16))
    # within one bf16 rounding of the exact product, and mostly equal to its rounding
    np.testing.assert_allclose(got, exact, rtol=2**-8, atol=1e-3)
    assert np.mean(got == rounded) > 0.95


def test_wider_output_and_vmap_over_a_batched_operand():
    a, b, _ = _inputs((4, 3, 2, 5), (3, 5, 6), jnp.bfloat16)
    y = matmul.einsum("ecd,edf->ecf", a[0], b, jnp.float32)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, jnp.einsum("ecd,edf->ecf", a[0], b,
                               preferred_element_type=jnp.float32), rtol=1e-6)  # fmt: skip
    # vmapped over a (a shared, unbatched b): the weight gradient is one contraction over
    # the batch too, as jax's own einsum transpose gives it
    loss = lambda a, b: jnp.sum(jax.vmap(lambda ai: matmul.einsum("ecd,edf->ecf", ai, b))(a))
    ga, gb = jax.grad(loss, (0, 1))(a, b)
    want = jax.grad(lambda a, b: jnp.sum(jnp.einsum("gecd,edf->gecf", a, b)), (0, 1))(a, b)
    np.testing.assert_array_equal(np.float32(gb), np.float32(want[1]))
    np.testing.assert_array_equal(np.float32(ga), np.float32(want[0]))
