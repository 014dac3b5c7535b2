import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from modjax import surgery
from modjax.computation.prompt import attention_with_prefix
from modjax.computation.sparse import saliency_mask
from modjax.layers.adapter import SequentialAdapter
from modjax.layers.lora import LoRA
from modjax.layers.params import LoRAParam, ModuleParam

V, D, F, L, T = 11, 8, 12, 3, 5


def _np_init(rng):
    # numpy initialisers: jax.random would compile a kernel per new shape (slow on CPU)
    return lambda key, shape, dtype=jnp.float32: jnp.asarray(0.3 * rng.normal(size=shape), dtype)


class Attention(nnx.Module):
    def __init__(self, rngs, init):
        kw = dict(kernel_init=init, bias_init=init, rngs=rngs)
        self.query = nnx.Linear(D, D, **kw)
        self.key = nnx.Linear(D, D, **kw)
        self.value = nnx.Einsum("btd,dhk->bthk", (D, 2, D // 2), **kw)
        self.out = nnx.Einsum("bthk,hkd->btd", (2, D // 2, D), **kw)

    def __call__(self, x):
        q, k = self.query(x), self.key(x)
        w = jax.nn.softmax(q @ k.swapaxes(-1, -2) / np.sqrt(D), axis=-1)
        return self.out(jnp.einsum("bqk,bkhd->bqhd", w, self.value(x)))


class MLP(nnx.Module):
    def __init__(self, rngs, init):
        kw = dict(kernel_init=init, bias_init=init, rngs=rngs)
        self.up, self.down = nnx.Linear(D, F, **kw), nnx.Linear(F, D, **kw)

    def __call__(self, x):
        return self.down(jax.nn.relu(self.up(x)))


class Block(nnx.Module):
    def __init__(self, rngs, init):
        self.attn, self.mlp = Attention(rngs, init), MLP(rngs, init)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.mlp(x)


class Model(nnx.Module):
    def __init__(self, seed=0):
        rngs, init = nnx.Rngs(seed), _np_init(np.random.default_rng(seed))
        self.embed = nnx.Embed(V, D, embedding_init=init, rngs=rngs)
        self.layers = nnx.List([Block(rngs, init) for _ in range(L)])
        self.head = nnx.Linear(D, V, kernel_init=init, bias_init=init, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


TOKENS = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
BASE_TOTAL = V * D + L * (2 * (D * D + D) + 2 * D * D + D * F + F + F * D + D) + D * V + V


def _randomize(model, filt, seed=0):
    rng = np.random.default_rng(seed)  # numpy: no per-shape compilation
    state = nnx.state(model, filt)
    state = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), state)
    nnx.update(model, state)


def _forward(model):
    return nnx.jit(lambda m, t: m(t))(model, TOKENS)


def test_lora_on_query_and_value_counts_and_merge():
    model = Model()
    y0 = _forward(model)
    assert surgery.count_params(model) == (0, BASE_TOTAL)
    r = 4
    paths = surgery.add_lora(model, "layers/*/attn/query", rank=r, rngs=nnx.Rngs(1))
    paths += surgery.add_lora(model, "layers/*/attn/value", rank=r, rngs=nnx.Rngs(2))
    assert paths == [f"layers/{i}/attn/{n}" for n in ("query", "value") for i in range(L)]
    # value is an einsum [D, 2, D/2]: D_out = 2 * D/2 = D
    trainable = L * 2 * r * (D + D)
    assert surgery.count_params(model) == (trainable, BASE_TOTAL + trainable)
    np.testing.assert_allclose(_forward(model), y0, atol=1e-6)  # B = 0: starts as the base
    _randomize(model, LoRAParam)
    y = _forward(model)
    assert not np.allclose(y, y0, atol=1e-3)
    unloaded = surgery.merge_and_unload(model)
    assert sorted(unloaded) == sorted(paths)
    assert type(model.layers[0].attn.query) is nnx.Linear
    assert type(model.layers[2].attn.value) is nnx.Einsum
    assert surgery.count_params(model) == (0, BASE_TOTAL)
    np.testing.assert_allclose(_forward(model), y, rtol=1e-4, atol=1e-4)


def test_regex_and_predicate_select_the_same():
    a, b = Model(), Model()
    pa = surgery.add_lora(a, r"layers/\d+/attn/(query|key)", regex=True, rank=2, rngs=nnx.Rngs(0))
    pb = surgery.add_lora(
        b, None, predicate=lambda p, m: isinstance(m, nnx.Linear) and "attn" in p, rank=2,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    assert sorted(pa) == sorted(pb) and len(pa) == 2 * L
    assert (
        surgery.count_params(a)
        == surgery.count_params(b)
        == (L * 2 * 2 * 2 * D, BASE_TOTAL + L * 8 * D)
    )


def test_adapter_after_every_ffn_and_parallel():
    model = Model()
    y0 = _forward(model)
    r = 3
    with pytest.raises(ValueError, match="cannot infer d_model of 'layers/0/mlp' \\(MLP\\)"):
        surgery.add_adapter(model, "layers/*/mlp", bottleneck_dim=r, rngs=nnx.Rngs(0))
    surgery.add_adapter(model, "layers/*/mlp", bottleneck_dim=r, d_model=D, rngs=nnx.Rngs(0))
    assert isinstance(model.layers[1].mlp, SequentialAdapter)
    per = 2 * D * r + r + D
    assert surgery.count_params(model).trainable == L * per
    np.testing.assert_allclose(_forward(model), y0, atol=1e-6)  # up = 0: identity at init
    # Houlsby: also after attention; parallel: beside the FFN's first projection
    surgery.add_adapter(model, "layers/*/attn", bottleneck_dim=r, d_model=D, rngs=nnx.Rngs(1))
    surgery.add_adapter(
        model, "**/mlp/base/up", placement="parallel", bottleneck_dim=r, rngs=nnx.Rngs(2)
    )
    assert surgery.count_params(model).trainable == 2 * L * per + L * (D * r + r + r * F + F)
    _randomize(model, ModuleParam)
    assert _forward(model).shape == (2, T, V)
    surgery.unload(model)
    assert type(model.layers[0].mlp) is MLP and type(model.layers[0].mlp.up) is nnx.Linear
    np.testing.assert_allclose(_forward(model), y0, atol=1e-6)


def test_prompt_ia3_sparse_counts():
    model = Model()
    surgery.add_prompt(model, "embed", prompt_length=3, d_model=D, rngs=nnx.Rngs(0))
    assert _forward(model).shape == (2, T + 3, V)
    assert surgery.count_params(model).trainable == 3 * D
    surgery.add_ia3(model, "layers/*/attn/key")
    surgery.add_ia3(model, "layers/*/mlp/up")
    assert surgery.count_params(model).trainable == 3 * D + L * (D + F)
    surgery.add_sparse_delta(model, "layers/*/mlp/down", density=0.25)
    assert surgery.count_params(model).trainable == 3 * D + L * (D + F) + L * round(0.25 * F * D)


def test_sparse_delta_by_saliency_scores():
    model = Model()
    w = model.layers[0].mlp.down.kernel[...]
    g = jax.random.normal(jax.random.key(0), w.shape)
    surgery.add_sparse_delta(
        model, "layers/0/mlp/down", density=0.1, scores={"layers/0/mlp/down": jnp.abs(w * g)}
    )
    idx = np.asarray(model.layers[0].mlp.down.indices[...])
    np.testing.assert_array_equal(idx, np.flatnonzero(saliency_mask(w, g, 0.1)))
    with pytest.raises(
        ValueError, match=r"scores given for paths that were not matched: \['nope'\]"
    ):
        surgery.add_sparse_delta(Model(), "layers/0/mlp/up", density=0.1, scores={"nope": w})


def test_freeze_train_step_changes_only_module_params():
    model = Model()
    surgery.add_lora(model, "layers/*/attn/query", rank=2, rngs=nnx.Rngs(1))
    surgery.add_adapter(model, "layers/*/mlp", bottleneck_dim=2, d_model=D, rngs=nnx.Rngs(2))
    frozen0 = jax.tree.map(np.asarray, nnx.state(model, surgery.FROZEN))
    trained0 = jax.tree.map(np.asarray, nnx.state(model, surgery.TRAINABLE))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=surgery.TRAINABLE)

    @nnx.jit
    def step(model, opt):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(TOKENS), TOKENS).mean()
        grads = nnx.grad(loss, argnums=nnx.DiffState(0, surgery.TRAINABLE))(model)
        opt.update(model, grads)

    step(model, opt)
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, surgery.FROZEN), frozen0)
    moved = jax.tree.map(
        lambda a, b: bool(np.any(a != b)), nnx.state(model, surgery.TRAINABLE), trained0
    )
    assert any(jax.tree.leaves(moved))
    labels = surgery.param_labels(model)
    flat = jax.tree_util.tree_leaves_with_path(labels)
    n_train = sum(1 for _, v in flat if v == "trainable")
    assert n_train == L * 2 + L * 4
    assert labels["layers"][0]["attn"]["query"]["lora_a"] == "trainable"
    assert labels["layers"][0]["attn"]["query"]["base"]["kernel"] == "frozen"
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = optax.multi_transform({"trainable": optax.sgd(1.0), "frozen": optax.set_to_zero()}, labels)
    tx.init(params)  # the label tree fits the parameter tree


def _full_surgery(model, seed):
    surgery.add_lora(model, "layers/*/attn/[qv]*", rank=2, rngs=nnx.Rngs(seed))
    surgery.add_adapter(model, "layers/*/mlp", bottleneck_dim=3, d_model=D, rngs=nnx.Rngs(seed + 1))
    surgery.add_ia3(model, "layers/*/attn/key")
    surgery.add_sparse_delta(model, "head", density=0.2)
    surgery.add_prompt(model, "embed", prompt_length=2, d_model=D, rngs=nnx.Rngs(seed + 2))
    surgery.add_hyper_lora(model, "layers/0/mlp/base/up", rank=2, num_tasks=2, rngs=nnx.Rngs(seed))


def test_save_load_module_params_reproduces_outputs_exactly(tmp_path):
    src = Model(seed=0)
    _full_surgery(src, 10)
    _randomize(src, ModuleParam, seed=3)
    y = _forward(src)
    path = tmp_path / "modules.npz"
    n = surgery.save_module_params(src, path)
    assert n == len(nnx.to_flat_state(nnx.state(src, surgery.MODULE_STATE)))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    with np.load(path) as data:
        keys = set(data.files) - {"__dtypes__"}
    want = {
        "/".join(map(str, k)) for k, _ in nnx.to_flat_state(nnx.state(src, surgery.MODULE_STATE))
    }
    assert keys == want and "layers/0/attn/query/lora_a" in keys and "head/indices" in keys
    assert not [k for k in keys if k.endswith("kernel")]  # the base model is not in the file

    dst = Model(seed=0)  # fresh base model, same surgery, other module inits
    _full_surgery(dst, 20)
    assert not np.allclose(_forward(dst), y)
    surgery.load_module_params(dst, path)
    np.testing.assert_array_equal(_forward(dst), y)


def test_save_load_bfloat16_and_mismatch(tmp_path):
    src = Model()
    surgery.add_lora(src, "layers/*/attn/query", rank=2, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    _randomize(src, LoRAParam)
    surgery.save_module_params(src, tmp_path / "m.npz")
    dst = Model()
    surgery.add_lora(dst, "layers/*/attn/query", rank=2, rngs=nnx.Rngs(1), param_dtype=jnp.bfloat16)
    surgery.load_module_params(dst, tmp_path / "m.npz")
    assert dst.layers[0].attn.query.lora_b[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(_forward(dst), _forward(src))
    other = Model()
    surgery.add_lora(other, "layers/*/attn/key", rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"missing \['layers/0/attn/key/lora_a'"):
        surgery.load_module_params(other, tmp_path / "m.npz")
    wrong_rank = Model()
    surgery.add_lora(wrong_rank, "layers/*/attn/query", rank=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"file has shape \(8, 2\), model has \(8, 3\)"):
        surgery.load_module_params(wrong_rank, tmp_path / "m.npz")
    float32 = Model()
    surgery.add_lora(float32, "layers/*/attn/query", rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"lora_a': file has dtype bfloat16, model has float32"):
        surgery.load_module_params(float32, tmp_path / "m.npz")
    with pytest.raises(ValueError, match="has no module parameters to save"):
        surgery.save_module_params(Model(), tmp_path / "empty.npz")


def test_errors_name_the_value():
    model = Model()
    with pytest.raises(
        ValueError,
        match=r"pattern '\*\*/attn/qkv' .*matches no module.*'layers/2/attn/query'.*'embed'",
    ):
        surgery.add_lora(model, "**/attn/qkv", rank=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        surgery.add_lora(model, "**/attn/query", rank=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="rank must be a positive int, got -2"):
        surgery.add_hyper_lora(model, "**/attn/query", rank=-2, num_tasks=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="matched 'layers/0/attn', a Attention without a `kernel`"):
        surgery.add_lora(model, "layers/0/attn", rank=2, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match="placement must be 'sequential' or 'parallel', got 'after'"
    ):
        surgery.add_adapter(
            model, "layers/*/mlp", bottleneck_dim=2, placement="after", rngs=nnx.Rngs(0)
        )
    assert not any(isinstance(m, LoRA) for _, m in surgery.named_modules(model))


def test_nested_matches_wrap_inner_first():
    model = Model()
    # "*query*" later also matches the LoRA's own base: wrap deepest first, then outer
    surgery.add_lora(model, "layers/0/attn/query", rank=2, rngs=nnx.Rngs(0))
    paths = surgery.add_ia3(
        model, "layers/0/attn/query**", predicate=lambda p, m: hasattr(m, "kernel")
    )
    assert paths == ["layers/0/attn/query/base"]
    assert isinstance(model.layers[0].attn.query.base, surgery.IA3Scaled)


def test_glob_semantics_and_list_elements():
    model = Model()
    names = [p for p, _ in surgery.find_modules(model, "layers/*")]
    assert names == [f"layers/{i}" for i in range(L)]  # `*` stays in one component
    deep = [
        p
        for p, _ in surgery.find_modules(model, "**/[!q]*", predicate=lambda p, m: p.endswith("y"))
    ]
    assert deep == [f"layers/{i}/attn/key" for i in range(L)]
    assert [p for p, _ in surgery.find_modules(model, "**/head")] == ["head"]
    with pytest.raises(ValueError, match="is not a valid regex"):
        surgery.find_modules(model, "layers/(", regex=True)
    # list elements themselves can be wrapped: an adapter after every block
    y0 = _forward(model)
    surgery.add_adapter(model, "layers/*", bottleneck_dim=2, d_model=D, rngs=nnx.Rngs(0))
    assert all(isinstance(b, SequentialAdapter) for b in model.layers)
    np.testing.assert_allclose(_forward(model), y0, atol=1e-6)


def test_saliency_scores_hand_computed_and_end_to_end():
    class Tiny(nnx.Module):
        def __init__(self):
            self.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.lin(x)

    model = Tiny()
    w = jnp.array([[1.0, -2.0], [0.5, 4.0], [-3.0, 0.1]])
    model.lin.kernel[...] = w
    x = jnp.array([[1.0, 2.0, -1.0]])
    scores = surgery.saliency_scores(model, lambda m: m(x).sum(), "lin")
    # dL/dW[i, j] = x[i]  ->  |w * g| = [[1, 2], [1, 8], [3, 0.1]]
    np.testing.assert_allclose(scores["lin"], [[1, 2], [1, 8], [3, 0.1]], rtol=1e-6)
    surgery.add_sparse_delta(model, "lin", density=0.5, scores=scores)
    np.testing.assert_array_equal(model.lin.indices[...], [1, 3, 4])  # 2, 8, 3 kept


def test_add_prefix_protocol():
    class PrefixAttention(nnx.Module):
        def __init__(self):
            self.num_heads, self.head_dim, self.prefix = 2, 4, None

        def __call__(self, q, k, v, mask):
            if self.prefix is not None:
                k, v, mask = self.prefix(k, v, mask)
            return attention_with_prefix(q, k, v, k[0, :0], v[0, :0], mask)

    class Net(nnx.Module):
        def __init__(self):
            self.blocks = nnx.List([PrefixAttention(), PrefixAttention()])
            self.mlp = MLP(nnx.Rngs(0), _np_init(np.random.default_rng(0)))

    net = Net()
    paths = surgery.add_prefix(net, "blocks/*", prefix_length=3, rngs=nnx.Rngs(0))
    assert paths == ["blocks/0", "blocks/1"]
    assert surgery.count_params(net).trainable == 2 * (2 * 3 * 2 * 4)
    q = k = v = jnp.ones((1, 5, 2, 4))
    mask = jnp.ones((1, 5), bool)
    blk = net.blocks[0]
    want = attention_with_prefix(
        q, k, v, blk.prefix.prefix_keys[...], blk.prefix.prefix_values[...], mask
    )
    np.testing.assert_allclose(blk(q, k, v, mask), want, rtol=1e-6)
    with pytest.raises(ValueError, match="matched 'mlp', a MLP without a `prefix` attribute"):
        surgery.add_prefix(net, "mlp", prefix_length=3, rngs=nnx.Rngs(0))
