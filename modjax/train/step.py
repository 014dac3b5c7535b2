"""The jitted train and eval steps: explicit ``nnx.split``/``nnx.merge``, parameters and
optimizer state sharded over the mesh by logical axis names, donated state buffers,
weighted auxiliary losses, aux-loss-free router bias updates outside the optimizer, and
the non-finite policy (skip the update and count it; or flag it so the loop stops).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from modjax.sharding import DEFAULT_RULES, state_shardings, variable_tree
from modjax.typing import Array

NONFINITE_POLICIES = ("skip", "stop")


class TrainState(NamedTuple):
    """Everything a run carries from step to step (and checkpoints).

    Attributes:
      step: int32 scalar, updates attempted so far.
      params: pure dict of ``nnx.Param`` values (all of them; frozen ones get no update).
      rest: pure dict of the model's other Variables (router biases, module state).
      opt_state: optax state of the partitioned optimizer.
      skipped: int32 scalar, updates skipped because loss or gradients were not finite.
    """

    step: Array
    params: dict
    rest: dict
    opt_state: Any
    skipped: Array


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """What the model is asked and how it is scored (the ``task`` config section).

    Attributes:
      name: ``"lm"`` (next-token cross-entropy; targets default to inputs shifted by one)
        or ``"classification"``.
      input_key, target_key: batch keys of the model input and the targets
        (``target_key=""`` for an LM: the input holds T + 1 tokens, the model reads the
        first T and is scored on the last T; a mask is then shaped like the input).
      mask_key: optional batch key of a 0/1 loss mask shaped like the targets.
      context: model keyword argument -> batch key, passed to sparse layers (e.g.
        ``{"task_ids": "task"}`` for task routing).
      aux_loss_weights: aux loss name -> weight; must name exactly the (unweighted)
        aux losses the model returns (checked at trace time), e.g.
        ``{"load_balancing": 0.01, "z_loss": 0.001}``.
    """

    name: str = "lm"
    input_key: str = "inputs"
    target_key: str = "targets"
    mask_key: str = ""
    context: Mapping[str, str] = dataclasses.field(default_factory=dict)
    aux_loss_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.name not in TASK_LOSSES:
            raise ValueError(f"task name must be one of {sorted(TASK_LOSSES)}, got {self.name!r}")


def _cross_entropy(logits, targets, mask):
    """Masked mean softmax cross-entropy of ``logits [..., V]`` against int ``targets [...]``.

    Computed in float32 from the logits as they come (bfloat16 logits are upcast inside the
    fused reductions, never materialised in float32). Two passes over the logits forward
    (max, then the sums) and one backward; accuracy reuses the max: a
    position counts as correct when its target's logit is a maximum (``argmax`` would need
    a third pass, and differs only on exact ties).
    """
    x = logits.astype(jnp.float32)
    top = jnp.max(x, axis=-1, keepdims=True)
    shifted = x - jax.lax.stop_gradient(top)
    lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    # the target's logit by a one-hot select, not a gather: the select's gradient fuses into
    # the softmax gradient (one pass writing the logits' cotangent in their dtype), where a
    # gather's is a scatter into a materialised float32 [..., V] buffer
    hit = targets[..., None] == jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    target_logit = jnp.sum(jnp.where(hit, shifted, 0.0), axis=-1)
    loss = lse - target_logit
    in_range = (targets >= 0) & (targets < x.shape[-1])  # an out-of-range target hits nothing
    correct = ((target_logit >= 0.0) & in_range).astype(jnp.float32)  # shifted: max is 0
    mask = jnp.ones_like(loss) if mask is None else mask.astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0)
    return (loss * mask).sum() / denom, {"accuracy": (correct * mask).sum() / denom}


def _batch_value(batch, key: str, field: str):
    if key not in batch:
        raise ValueError(f"{field}={key!r} is not a batch key; the batch has {sorted(batch)}")
    return batch[key]


def _model_call(model, batch, task: TaskConfig, train: bool, inputs=None):
    if inputs is None:
        inputs = _batch_value(batch, task.input_key, "task.input_key")
    context = {
        arg: _batch_value(batch, key, f"task.context[{arg!r}]") for arg, key in task.context.items()
    }
    return model(inputs, train=train, **context)


def _loss_mask(batch, task: TaskConfig):
    return _batch_value(batch, task.mask_key, "task.mask_key") if task.mask_key else None


def lm_loss(model, batch, task: TaskConfig, train: bool = False):
    """Next-token cross-entropy of a causal LM, averaged over (masked) positions."""
    mask = _loss_mask(batch, task)
    if task.target_key:
        logits, aux = _model_call(model, batch, task, train)
        targets = _batch_value(batch, task.target_key, "task.target_key")
    else:  # one sequence of T + 1 tokens: the model reads the first T, predicts the last T
        tokens = _batch_value(batch, task.input_key, "task.input_key")
        logits, aux = _model_call(model, batch, task, train, inputs=tokens[:, :-1])
        targets = tokens[:, 1:]
        mask = None if mask is None else mask[:, 1:]
    loss, metrics = _cross_entropy(logits, targets, mask)
    return loss, metrics, aux


def classification_loss(model, batch, task: TaskConfig, train: bool = False):
    """Softmax cross-entropy of class logits ``[B, classes]`` against int labels ``[B]``."""
    logits, aux = _model_call(model, batch, task, train)
    targets = _batch_value(batch, task.target_key, "task.target_key")
    loss, metrics = _cross_entropy(logits, targets, _loss_mask(batch, task))
    return loss, metrics, aux


TASK_LOSSES: dict[str, Callable] = {"lm": lm_loss, "classification": classification_loss}


def weighted_aux_loss(aux_losses: Mapping[str, Array], weights: Mapping[str, float]) -> Array:
    """``sum_name weights[name] * aux_losses[name]``.

    Routers return unweighted losses, so every loss the model returns needs a weight (0.0
    to ignore it), and every weight must name a returned loss: a misspelt name fails at
    trace time instead of silently training without the loss.
    """
    missing = sorted(set(aux_losses) - set(weights))
    unknown = sorted(set(weights) - set(aux_losses))
    if missing or unknown:
        raise ValueError(
            f"task.aux_loss_weights={dict(weights)} must name exactly the aux losses the "
            f"model returns, {sorted(aux_losses)} (missing {missing}, unknown {unknown})"
        )
    total = jnp.zeros((), jnp.float32)
    for name, value in aux_losses.items():
        total = total + weights[name] * value
    return total


def router_bias_mask(rest_state: nnx.State) -> dict:
    """A pure dict of booleans: which Variables of ``rest_state`` are ``RouterBias``."""
    from modjax.layers.router import RouterBias

    return variable_tree(rest_state, lambda p, v: isinstance(v, RouterBias))


def update_router_biases(rest: dict, bias_mask: dict, expert_load: Array | None, rate: float):
    """Aux-loss-free load balancing (Wang et al. 2024, DeepSeek-V3): each MoE block's
    router bias moves by ``rate * sign(mean_load - load)``; biases get no gradient.

    The router biases of ``rest`` (flagged by ``bias_mask``) are matched, in tree order,
    to the rows of ``expert_load [L_moe, E]``.

    This is the rule of ``modjax.routing.losses.aux_free_bias_update`` (what
    ``Router.update_bias`` calls), applied to the loads the MoE layers report: that
    function takes a ``Routing`` and counts assignments before capacity drops, while a
    layer reports only ``expert_load`` (kept assignments), so the sign step is repeated
    here rather than called. With dropless routing the two loads agree.
    """
    leaves, treedef = jax.tree.flatten(rest)
    flags = jax.tree.leaves(bias_mask)
    idx = [i for i, f in enumerate(flags) if f]
    if not idx or rate == 0.0:
        return rest
    if expert_load is None or expert_load.shape[0] != len(idx):
        shape = None if expert_load is None else tuple(expert_load.shape)
        raise ValueError(
            f"bias_update_rate={rate} needs one expert_load row per router bias: the model "
            f"has {len(idx)} router biases but expert_load has shape {shape}"
        )
    for row, i in enumerate(idx):
        load = expert_load[row]
        step = rate * jnp.sign(load.mean() - load)
        leaves[i] = (leaves[i] + step.astype(leaves[i].dtype)).astype(leaves[i].dtype)
    return jax.tree.unflatten(treedef, leaves)


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    task: TaskConfig,
    *,
    labels: dict,
    bias_mask: dict,
    bias_update_rate: float = 0.0,
):
    """A pure ``(state, batch) -> (state, metrics)`` train step (to be jitted).

    Non-finite loss or gradients leave params and optimizer state unchanged and add one
    to ``state.skipped``; ``metrics["nonfinite"]`` is 1.0 for such a step. The test is on
    the loss and the gradients' global norm (NaN or inf if any gradient is), both known
    before the update, so the keep-or-skip select fuses into the optimizer's update
    instead of a separate pass over parameters and optimizer state after a check of every
    new parameter (on an H200: ~400 small kernels, 3.8 ms of a 71 ms step).
    """
    loss_fn_of_task = TASK_LOSSES[task.name]
    trainable = jax.tree.map(lambda lab: lab != "frozen", labels)
    if bias_update_rate < 0:
        raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate!r}")
    if bias_update_rate and not any(jax.tree.leaves(bias_mask)):
        raise ValueError(
            f"bias_update_rate={bias_update_rate} but the model has no router bias: build "
            "the MoE layers with aux_loss_free=True (model sparse_kwargs), or set the rate to 0"
        )

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        def loss_fn(params):
            model = nnx.merge(graphdef, params, state.rest)
            loss, metrics, aux = loss_fn_of_task(model, batch, task, train=True)
            aux_total = weighted_aux_loss(aux["aux_losses"], task.aux_loss_weights)
            new_rest = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
            return loss + aux_total, (loss, metrics, aux, new_rest)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (total, (loss, metrics, aux, new_rest)), grads = grad_fn(state.params)
        grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        new_rest = update_router_biases(
            new_rest, bias_mask, aux.get("expert_load"), bias_update_rate
        )

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            rest=keep(new_rest, state.rest),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        )
        out = {
            "loss": loss,
            "total_loss": total,
            "grad_norm": grad_norm,
            "nonfinite": (~finite).astype(jnp.float32),
            **metrics,
            **{f"aux/{k}": v for k, v in aux["aux_losses"].items()},
            **{f"moe/{k}": v for k, v in aux["metrics"].items()},
        }
        if aux.get("expert_load") is not None:
            out["expert_load"] = aux["expert_load"]
        return new_state, out

    return train_step


def make_eval_step(graphdef, task: TaskConfig):
    """A pure ``(state, batch) -> metrics`` eval step (loss, accuracy, aux losses)."""
    loss_fn_of_task = TASK_LOSSES[task.name]

    def eval_step(state: TrainState, batch: dict) -> dict:
        model = nnx.merge(graphdef, state.params, state.rest)
        loss, metrics, aux = loss_fn_of_task(model, batch, task)
        return {"loss": loss, **metrics, **{f"aux/{k}": v for k, v in aux["aux_losses"].items()}}

    return eval_step


def split_model(model: nnx.Module):
    """``(graphdef, params_state, rest_state)``: ``nnx.Param`` Variables and the rest."""
    return nnx.split(model, nnx.Param, ...)


def _has_cpu_backend() -> bool:
    try:
        return bool(jax.devices("cpu"))
    except RuntimeError:
        return False


def init_train_state(
    model_fn: Callable[[], nnx.Module],
    tx_fn: Callable[[nnx.State], optax.GradientTransformation],
    mesh: jax.sharding.Mesh,
    rules: Mapping = DEFAULT_RULES,
    host_init: bool | None = None,
):
    """Build the model, shard it over ``mesh`` by logical names and init the optimizer.

    Args:
      model_fn: builds the model (called under ``jax.eval_shape`` and once for real,
        inside one jit).
      tx_fn: the optimizer from the abstract params state (for partition labels).
      rules: logical axis rules.
      host_init: run that jit on the host CPU and copy the values onto ``mesh``
        (``True``), or run it on the mesh with sharded outputs so parameters are born
        sharded (``False``). ``None``: host on GPU meshes of one process when jax's CPU
        backend is loaded (a warning when it is not), mesh otherwise. XLA:GPU compiles
        one large initialisation graph in time superlinear in its size (the 12-layer LM
        of ``benchmarks/train_step.py``: 6 s at 2 layers, 17 s at 4, over 170 s at 12 on
        an H200, jax 0.11.2) while XLA:CPU takes ~11 s for all 12; host init also gives
        the same initial values on every backend. It needs the host to hold the full
        model once.

    Returns:
      ``(graphdef, state, tx, shardings)`` where ``shardings`` is the TrainState of
      NamedShardings.
    """
    abstract = nnx.eval_shape(model_fn)
    graphdef, abs_params, abs_rest = split_model(abstract)
    tx = tx_fn(abs_params)
    param_sh = state_shardings(abs_params, mesh, rules)
    rest_sh = state_shardings(abs_rest, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.P())

    def init(constrain: bool = True):
        _, params, rest = split_model(model_fn())
        params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        if constrain:
            params = jax.lax.with_sharding_constraint(params, param_sh)
        return params, rest

    platform = mesh.devices.flat[0].platform
    if host_init is None:
        one_gpu_process = platform == "gpu" and jax.process_count() == 1
        host_init = one_gpu_process and _has_cpu_backend()
        if one_gpu_process and not host_init:
            warnings.warn(
                "init_train_state: initialising on the GPU because jax's CPU backend is not "
                f"loaded (JAX_PLATFORMS={jax.config.jax_platforms!r}); XLA:GPU compiles a "
                "large init slowly (minutes for a 12-layer LM). Add 'cpu' to JAX_PLATFORMS "
                "(e.g. 'cuda,cpu') to initialise on the host.",
                stacklevel=2,
            )
    if host_init:
        if jax.process_count() > 1:
            raise ValueError("host_init=True needs a single-process run; got "
                             f"jax.process_count()={jax.process_count()}")  # fmt: skip
        if not _has_cpu_backend():
            raise RuntimeError(
                "host_init=True needs jax's CPU backend next to the accelerator; include it "
                f"in JAX_PLATFORMS (e.g. 'cuda,cpu'; now {jax.config.jax_platforms!r}) or "
                "pass host_init=False"
            )
        with jax.default_device(jax.devices("cpu")[0]):
            host_params, host_rest = jax.jit(init, static_argnums=0)(False)
        params = jax.device_put(host_params, param_sh)
        rest = jax.device_put(host_rest, rest_sh)
    with jax.set_mesh(mesh):
        if not host_init:
            params, rest = jax.jit(init, out_shardings=(param_sh, rest_sh))()
        opt_state = jax.jit(tx.init)(params)
    opt_sh = jax.tree.map(lambda x: x.sharding, opt_state)

    def zero():
        return jax.device_put(jnp.zeros((), jnp.int32), replicated)

    state = TrainState(step=zero(), params=params, rest=rest, opt_state=opt_state, skipped=zero())
    shardings = TrainState(
        step=replicated, params=param_sh, rest=rest_sh, opt_state=opt_sh, skipped=replicated
    )
    return graphdef, state, tx, shardings


__all__ = [
    "NONFINITE_POLICIES",
    "TASK_LOSSES",
    "TaskConfig",
    "TrainState",
    "classification_loss",
    "init_train_state",
    "lm_loss",
    "make_eval_step",
    "make_train_step",
    "router_bias_mask",
    "split_model",
    "update_router_biases",
    "weighted_aux_loss",
]
