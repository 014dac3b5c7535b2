"""Optimizer: warmup+cosine schedule, partitions (frozen base, modules, routers)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from modjax import surgery
from modjax.layers.router import RouterParam
from modjax.models import MLP, MLPConfig
from modjax.train.optim import OptimizerConfig, make_optimizer, param_labels


def test_schedule_warmup_then_cosine():
    from modjax.train.optim import learning_rate_schedule

    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, decay_steps=100, end_lr_ratio=0.1)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 0.1 + 0.9 * 0.5, rtol=1e-5)
    np.testing.assert_allclose(float(lr(110)), 0.1, rtol=1e-5)


def test_bad_optimizer_config():
    with pytest.raises(ValueError, match="optimizer name"):
        OptimizerConfig(name="adagrad9")
    with pytest.raises(ValueError, match="freeze"):
        OptimizerConfig(freeze="most")
    with pytest.raises(ValueError, match="warmup_steps"):
        OptimizerConfig(warmup_steps=-1)


def _model():
    cfg = MLPConfig(in_features=4, num_classes=3, d_model=8, d_ff=16, num_layers=1, ffn="moe",
                    sparse_kwargs=dict(num_experts=2, k=1, strategy="einsum"))  # fmt: skip
    model = MLP(cfg, rngs=nnx.Rngs(0))
    surgery.add_lora(model, "input", rank=2, rngs=nnx.Rngs(1))
    return model


def _labels_and_update(cfg):
    model = _model()
    params_state = nnx.state(model, nnx.Param)
    labels = param_labels(params_state, cfg)
    params = nnx.to_pure_dict(params_state)
    tx = make_optimizer(cfg, labels)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return params_state, labels, updates


def _flat(tree):
    return {
        "/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_partitions_frozen_base_lora_router():
    cfg = OptimizerConfig(name="sgd", b1=0.0, learning_rate=1.0, router_lr_ratio=0.25,
                          freeze="base", grad_clip_norm=0.0)  # fmt: skip
    params_state, labels, updates = _labels_and_update(cfg)
    types = _flat(nnx.to_pure_dict(jax.tree.map(lambda v: v, params_state)))
    flat_labels, flat_updates = _flat(labels), _flat(updates)
    kinds = {
        path: type(v).__name__
        for path, v in ((("/".join(map(str, p))), v) for p, v in nnx.to_flat_state(params_state))
    }
    assert set(flat_labels) == set(types)
    seen = set()
    for path, lab in flat_labels.items():
        u = np.asarray(flat_updates[path])
        if kinds[path] == "RouterParam":
            assert lab == "router"
            np.testing.assert_allclose(u, -0.25)
        elif kinds[path] == "LoRAParam":
            assert lab == "default"
            np.testing.assert_allclose(u, -1.0)
        else:
            assert lab == "frozen"
            np.testing.assert_array_equal(u, 0.0)
        seen.add(lab)
    assert seen == {"router", "default", "frozen"}
    assert issubclass(RouterParam, nnx.Param)


def test_freeze_patterns_and_clipping():
    cfg = OptimizerConfig(name="sgd", b1=0.0, learning_rate=1.0, freeze_patterns=("head",),
                          grad_clip_norm=1e-3)  # fmt: skip
    _, labels, updates = _labels_and_update(cfg)
    flat_labels, flat_updates = _flat(labels), _flat(updates)
    assert flat_labels["head/kernel"] == "frozen"
    assert flat_labels["input/base/kernel"] == "default"
    default = [flat_updates[p] for p, lab in flat_labels.items() if lab == "default"]
    np.testing.assert_allclose(float(optax.tree.norm(default)), 1e-3, rtol=1e-4)
