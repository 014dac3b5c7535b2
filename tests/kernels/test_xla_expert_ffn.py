"""The fused XLA expert FFN (``modjax.kernels.xla_expert_ffn``, the CPU path of
``expert_ffn_blocks``) against its reference twin, the grouped-matmul composition with
``impl="reference"``: values and gradients on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modjax.computation import ffn as F
from modjax.kernels import grouped_matmul as gm
from modjax.kernels import xla_expert_ffn
from tests.kernels.routing_cases import group_ids


def _case(kind, act, m=300, d=24, f=40, g=5, bs=16, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    ids = group_ids(kind, m, g, rng)
    pos, src, layout = gm.sort_to_blocks(jnp.asarray(ids), g, bs)
    x = jnp.asarray(rng.normal(size=(m, d)), dtype)
    xp = gm.to_blocks(x, src, pos, jnp.ones(m, bool))
    params = {n: jnp.asarray(rng.normal(size=(g, d, f)) / d**0.5, dtype)
              for n in F.ACTIVATIONS[act]}  # fmt: skip
    params["wo"] = jnp.asarray(rng.normal(size=(g, f, d)) / f**0.5, dtype)
    ct = jnp.asarray(rng.normal(size=xp.shape), jnp.float32)
    return layout, xp, params, ct


def _value_and_grad(impl, act, layout, bs, ct):
    def loss(xp, p):
        y = F.expert_ffn_blocks(xp, p, layout, activation=act, block_size=bs, impl=impl)
        return jnp.sum(y.astype(jnp.float32) * ct), y

    return jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))


@pytest.mark.parametrize("act", ["swiglu", "gelu"])
@pytest.mark.parametrize("kind", ["random", "skewed", "empty"])
@pytest.mark.parametrize("bs", [16, 8])
def test_fused_equals_grouped_matmuls_values_and_grads(act, kind, bs):
    layout, xp, params, ct = _case(kind, act, bs=bs, m=301, d=24, f=40)  # no tile multiples
    (va, ya), ga = _value_and_grad("xla", act, layout, bs, ct)(xp, params)
    (vb, yb), gb = _value_and_grad("reference", act, layout, bs, ct)(xp, params)
    np.testing.assert_allclose(ya, yb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(va, vb, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        assert a.dtype == b.dtype
    assert float(jnp.abs(ga[1]["wo"]).max()) > 0
    used = int(layout.group_start[-1]) * bs
    assert used < ya.shape[0] and not np.asarray(ya[used:]).any()  # unused blocks: zeros


def test_fused_bf16_matches_float32_reference():
    layout, xp, params, ct = _case("random", "swiglu", dtype=jnp.bfloat16)
    (_, y), g = _value_and_grad("xla", "swiglu", layout, 16, ct)(xp, params)
    f32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
    (_, yr), gr = _value_and_grad("reference", "swiglu", layout, 16, ct)(f32(xp), f32(params))
    assert y.dtype == jnp.bfloat16 and g[1]["wo"].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves((y, g)), jax.tree.leaves((yr, gr)), strict=True):
        a, b = np.float32(a), np.float32(b)
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2


def test_unused_blocks_are_never_read():
    # NaN in every row of the unused blocks: values and gradients stay finite and equal
    layout, xp, params, ct = _case("skewed", "swiglu")
    used = int(layout.group_start[-1]) * 16
    poisoned = xp.at[used:].set(jnp.nan)
    (va, ya), ga = _value_and_grad("xla", "swiglu", layout, 16, ct)(xp, params)
    (vb, yb), gb = _value_and_grad("xla", "swiglu", layout, 16, ct)(poisoned, params)
    np.testing.assert_array_equal(ya, yb)
    for a, b in zip(jax.tree.leaves(ga[1]), jax.tree.leaves(gb[1]), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.asarray(gb[0][used:]).any()


def test_auto_off_the_gpu_takes_the_fused_loop(monkeypatch):
    layout, xp, params, _ = _case("random", "gelu")
    calls = []
    real = xla_expert_ffn.expert_ffn
    monkeypatch.setattr(
        xla_expert_ffn, "expert_ffn", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    expected = [1] if not gm._on_gpu() else []
    F.expert_ffn_blocks(xp, params, layout, activation="gelu", block_size=16, impl="auto")
    assert calls == expected
    F.expert_ffn_blocks(xp, params, layout, activation="gelu", block_size=16, impl="reference")
    assert calls == expected  # a forced grouped-matmul impl keeps the grouped matmuls


def test_rows_and_dtypes_must_match():
    layout, xp, params, _ = _case("random", "gelu")
    with pytest.raises(ValueError, match="x dtype must be one of float32/bfloat16/float16"):
        F.expert_ffn_blocks(xp.astype(jnp.int32), params, layout, activation="gelu",
                            block_size=16)  # fmt: skip
    with pytest.raises(ValueError, match=r"x has 100 rows, not a whole number of 16-row blocks"):
        xla_expert_ffn.expert_ffn(
            xp[:100], (params["wi"],), params["wo"], layout.group_start,
            F._hidden_fn("gelu"), block_size=16,
        )  # fmt: skip


@pytest.mark.parametrize("sizes", [[5, 0, 9, 1], [0, 0, 3], [13]])
def test_segments_cover_the_used_blocks_once_in_order(sizes):
    layout = gm.group_layout(jnp.asarray(sizes), sum(sizes) + 7, 1)  # one row per block
    nb = layout.num_blocks
    group, first, size, count = xla_expert_ffn._segments(layout.group_start, nb, 4)
    count = int(count)
    covered = [(int(g), b) for g, f, s in zip(group[:count], first[:count], size[:count])
               for b in range(int(f), int(f) + int(s))]  # fmt: skip
    starts = [int(s) for s in layout.group_start]
    want = [(g, b) for g in range(len(sizes)) for b in range(starts[g], starts[g + 1])]
    assert covered == want
    assert all(1 <= int(s) <= 4 for s in size[:count])
