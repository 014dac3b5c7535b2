"""The project trainer (modjax.train.step) on a Transformer LM with MoE blocks: a few
steps on the mesh (data=2, expert=4) give the losses of one
device. The model code is the same; the mesh alone selects the expert-parallel path.

Tolerance: float32 losses to rtol = 1e-5 (sharded reductions sum in other orders).
"""

import jax
import numpy as np
import pytest
from flax import nnx

from modjax.models.transformer import TransformerConfig, TransformerLM
from modjax.sharding import batch_sharding, make_mesh
from modjax.train.optim import OptimizerConfig, make_optimizer, param_labels
from modjax.train.step import (
    TaskConfig,
    init_train_state,
    make_train_step,
    router_bias_mask,
)

STEPS = 2


def _config():
    return TransformerConfig(
        vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_ff=32, ffn="moe",
        sparse_placement="all",
        sparse_kwargs={"num_experts": 8, "k": 2, "block_size": 8},
    )  # fmt: skip


def _losses(mesh) -> list[float]:
    opt = OptimizerConfig(name="adamw", learning_rate=1e-2)
    labels_box = {}

    def tx_fn(abs_params):
        labels_box["labels"] = param_labels(abs_params, opt)
        return make_optimizer(opt, labels_box["labels"])

    graphdef, state, _, shardings = init_train_state(
        lambda: TransformerLM(_config(), rngs=nnx.Rngs(0)), tx_fn, mesh
    )
    tx = make_optimizer(opt, labels_box["labels"])
    abstract = nnx.eval_shape(lambda: TransformerLM(_config(), rngs=nnx.Rngs(0)))
    bias_mask = router_bias_mask(nnx.split(abstract, nnx.Param, ...)[2])
    step = make_train_step(
        graphdef,
        tx,
        TaskConfig(name="lm", aux_loss_weights={"load_balancing": 0.01, "z_loss": 0.001}),
        labels=labels_box["labels"],
        bias_mask=bias_mask,
    )
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (8, 9), 0, 32))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    losses = []
    with jax.set_mesh(mesh):
        batch = jax.device_put(batch, batch_sharding(mesh, 2))
        jitted = jax.jit(step, out_shardings=(shardings, None))
        for _ in range(STEPS):
            state, metrics = jitted(state, batch)
            losses.append(float(metrics["loss"]))
            assert ("moe/ep_overflow" in metrics) == (mesh.shape["expert"] > 1)
    return losses


@pytest.fixture(scope="module")
def one_device_losses():
    return _losses(make_mesh(data=1, devices=jax.devices()[:1]))


# (data=8) and the checkpoint restore run with a smaller model in test_train_mesh.py.
@pytest.mark.parametrize("mesh_shape", [dict(data=2, expert=4)], ids=str)
def test_trainer_losses_equal_one_device(mesh_shape, one_device_losses):
    losses = _losses(make_mesh(**mesh_shape))
    np.testing.assert_allclose(losses, one_device_losses, rtol=1e-5)
    assert one_device_losses[-1] < one_device_losses[0]
