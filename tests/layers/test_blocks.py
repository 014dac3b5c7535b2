"""Composition blocks (Stack, Parallel, Fuse, Average, BatchSplit, Split) against
manual composition and numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from modjax.layers.blocks import Average, BatchSplit, Fuse, Parallel, Split, Stack
from modjax.layers.lora import LoRA
from tests.layers.composition_reference import D, close, linears, np_linear, rand_x


def test_stack_order_matters_and_matches_manual():
    a, b = linears(2)
    x = rand_x(12)
    close(Stack(a, b)(x), np_linear(b, np_linear(a, x)))
    close(Stack(b, a)(x), np_linear(a, np_linear(b, x)))
    assert not np.allclose(Stack(a, b)(x), Stack(b, a)(x), atol=1e-3)


def test_parallel_reductions():
    mods = linears(2)
    x = rand_x(13)
    outs = [np_linear(m, x) for m in mods]
    close(Parallel(*mods)(x), outs[0] + outs[1])
    close(Parallel(*mods, reduce="mean")(x), (outs[0] + outs[1]) / 2)
    close(Parallel(*mods, reduce="stack")(x), np.stack(outs))


def test_fuse_weights_sum_to_one_and_match_reference():
    mods = linears(3)
    fuse = Fuse(mods, D, temperature=2.0, rngs=nnx.Rngs(3))
    fuse.value[...] = jax.random.normal(jax.random.key(0), (D, D))
    x = rand_x(14)
    att, fused = nnx.jit(lambda f, x: (f.attend(x), f(x)))(fuse, x)
    close(att.weights.sum(-1), np.ones((3, 5)))
    o = np.stack([np_linear(m, x) for m in mods], -2)  # [B, T, E, D]
    q = np.asarray(x) @ np.asarray(fuse.query[...])
    k = o @ np.asarray(fuse.key[...])
    v = o @ np.asarray(fuse.value[...])
    s = np.einsum("btd,bted->bte", q, k) / 2.0
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    close(att.weights, a)
    close(fused, np.einsum("bte,bted->btd", a, v))
    res = Fuse(mods, D, residual=True, rngs=nnx.Rngs(3))
    close(res(x), np.asarray(x) + np.asarray(res.attend(x).output))
    g = nnx.jit(nnx.grad(lambda f: (f(x) ** 2).sum()))(fuse)
    assert float(jnp.abs(g["query"][...]).sum()) > 0


def test_average_output_and_parameter_space():
    mods = linears(3)
    x = rand_x(15)
    w = [0.5, 0.3, 0.2]
    out_space = Average(mods, w)(x)
    close(out_space, sum(w[e] * np_linear(mods[e], x) for e in range(3)))
    one_hot = Average(mods, [0.0, 1.0, 0.0], space="parameter")
    close(nnx.jit(lambda m, x: m(x))(one_hot, x), mods[1](x))
    merged = Average(mods, w, space="parameter")(x)
    k = sum(w[e] * np.asarray(mods[e].kernel[...]) for e in range(3))
    bias = sum(w[e] * np.asarray(mods[e].bias[...]) for e in range(3))
    close(merged, np.asarray(x) @ k + bias)
    close(Average(mods, space="parameter")(x, weights=jnp.array([1.0, 0, 0])), mods[0](x))


@pytest.mark.parametrize("mode", ["stacked", "masked"])
def test_batch_split_mixed_batch_equals_rows_alone(mode):
    mods = linears(3)
    x = rand_x(16, (4, 5, D))
    ids = jnp.array([2, 0, 2, 1])
    block = BatchSplit(mods, mode=mode)
    out = nnx.jit(lambda m, x, i: m(x, ids=i))(block, x, ids)
    for b in range(4):
        close(out[b], mods[int(ids[b])](x[b : b + 1])[0])


def test_batch_split_heterogeneous_modules_nested_in_stack():
    a, b, c = linears(3)
    block = BatchSplit([a, Stack(b, c)])
    assert block.mode == "masked"
    x = rand_x(17)
    ids = jnp.array([1, 0, 1])
    out = Stack(block, a)(x, ids=ids)
    for r in range(3):
        inner = np_linear(a, x[r]) if ids[r] == 0 else np_linear(c, np_linear(b, x[r]))
        close(out[r], np_linear(a, inner))


def test_split_by_position():
    a, b = linears(2)
    x = rand_x(18)
    out = Split(a, b, n=2)(x)
    close(out[:, :2], np_linear(a, x[:, :2]))
    close(out[:, 2:], np_linear(b, x[:, 2:]))
    close(Split(a, b, n=0)(x), np_linear(b, x))
    close(Split(a, b, n=5)(x), np_linear(a, x))


def test_blocks_bad_input():
    mods = linears(3)
    x = rand_x()
    assert BatchSplit([mods[0], lambda x: 2 * x]).mode == "masked"
    with pytest.raises(ValueError, match=r"weights must be 3 floats .*got \[0.5, 0.5\]"):
        Average(mods, [0.5, 0.5])
    with pytest.raises(ValueError, match="space must be one of"):
        Average(mods, space="weights")
    with pytest.raises(ValueError, match=r"modules\[1\] \(LoRA\) differs"):
        lora = LoRA(nnx.Linear(D, D, rngs=nnx.Rngs(0)), rank=2, rngs=nnx.Rngs(0))
        Average([mods[0], lora], space="parameter")
    with pytest.raises(ValueError, match=r"ids must be int \[B\] with B = 3.*\(2,\)"):
        BatchSplit(mods)(x, ids=jnp.array([0, 1]))
    for mode in ("stacked", "masked"):
        with pytest.raises(ValueError, match=r"ids must be in \[0, 3\), got values \[3\]"):
            BatchSplit(mods, mode=mode)(x, ids=jnp.array([0, 3, 1]))
    with pytest.raises(ValueError, match="BatchSplit needs ids"):
        BatchSplit(mods)(x)
    with pytest.raises(ValueError, match=r"Split\(n=6\)"):
        Split(mods[0], mods[1], n=6)(x)
    with pytest.raises(ValueError, match="reduce must be one of"):
        Parallel(*mods, reduce="max")
    with pytest.raises(ValueError, match="modules must be a non-empty sequence"):
        Stack()
    with pytest.raises(ValueError, match="temperature must be a positive float, got -1"):
        Fuse(mods, D, temperature=-1, rngs=nnx.Rngs(0))
