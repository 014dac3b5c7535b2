"""The trainer's command line: ``python -m modjax.train --config experiments/NAME.py[:ARG]
--workdir DIR [--config.KEY=VALUE ...]`` (also the ``modjax`` console command).

This is the one place that reads a ConfigDict: each section becomes the keyword
arguments of a dataclass or constructor (``model`` -> the model family's Config,
``optimizer`` -> OptimizerConfig, ``task`` -> TaskConfig, ``train`` -> LoopConfig,
``mesh`` -> make_mesh, ``data`` -> make_dataset), so a misspelt key fails loudly.

Multi-host: when the environment shows several processes (Slurm with more than one
task, a multi-host TPU VM slice, Open MPI, or explicit ``MODJAX_COORDINATOR`` /
``MODJAX_NUM_PROCESSES`` / ``MODJAX_PROCESS_ID``), ``jax.distributed.initialize`` runs
before anything touches a device.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

USAGE = (
    "usage: python -m modjax.train --config experiments/NAME.py[:ARG] --workdir DIR "
    "[--config.KEY=VALUE ...]"
)
FROM_DATA = -1  # a model size set to -1 is taken from the dataset (vocab, classes, tasks)
_FROM_DATA_ATTRS = {
    "vocab_size": "vocab_size",
    "num_classes": "num_classes",
    "num_tasks": "num_tasks",
}


def is_multi_process(env: Mapping[str, str]) -> bool:
    """Whether the environment describes a multi-process (multi-host) launch."""
    if env.get("MODJAX_COORDINATOR"):
        return True
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(env.get(key, "1") or "1") > 1:
            return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def maybe_initialize_distributed(env: Mapping[str, str] = os.environ) -> bool:
    """Call ``jax.distributed.initialize`` for multi-process launches; True if it did."""
    if not is_multi_process(env):
        return False
    import jax

    if env.get("MODJAX_COORDINATOR"):
        jax.distributed.initialize(
            coordinator_address=env["MODJAX_COORDINATOR"],
            num_processes=int(env["MODJAX_NUM_PROCESSES"]),
            process_id=int(env["MODJAX_PROCESS_ID"]),
        )
    else:  # Slurm, Open MPI and TPU VM slices are detected by jax itself
        jax.distributed.initialize()
    return True


def _fill_from_data(model_kwargs: dict, dataset) -> dict:
    out = dict(model_kwargs)
    for key, attr in _FROM_DATA_ATTRS.items():
        if out.get(key) == FROM_DATA:
            if not hasattr(dataset, attr):
                raise ValueError(f"model.config.{key}=-1 but the dataset has no {attr!r}")
            out[key] = int(getattr(dataset, attr))
    return out


_SURGERY_OPS = (
    "add_lora", "add_adapter", "add_ia3", "add_prompt", "add_sparse_delta", "add_hyper_lora",
)  # fmt: skip


def apply_surgery(model, steps: Mapping[str, Mapping[str, Any]], seed: int):
    """Apply named surgery steps in order: ``{step_name: {"op": "add_lora",
    "pattern": "blocks/*/attention/query", "rank": 8, ...}}`` (rngs are supplied)."""
    if not steps:
        return model
    import inspect

    from flax import nnx

    from modjax import surgery

    for i, (step_name, kwargs) in enumerate(steps.items()):
        kwargs = dict(kwargs)
        op = kwargs.pop("op", None)
        if op not in _SURGERY_OPS:
            raise ValueError(f"surgery.{step_name}.op must be one of {_SURGERY_OPS}, got {op!r}")
        fn = getattr(surgery, op)
        if "rngs" in inspect.signature(fn).parameters:
            kwargs["rngs"] = nnx.Rngs(seed + 7919 * (i + 1))
        paths = fn(model, **kwargs)
        if not paths:
            raise ValueError(f"surgery.{step_name} ({op}) matched no module: {kwargs}")
    return model


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def load_base_params(params: dict, path: str, base_model_fn, mesh) -> dict:
    """``params`` with the base-model parameters exported to ``path`` (``params.npz`` of
    an earlier run) put in place; surgery wrappers keep the wrapped module as ``base``,
    so ``a/query/kernel`` of the file goes to ``a/query/base/kernel`` after a LoRA."""
    import jax
    from flax import nnx

    from modjax.sharding import state_shardings
    from modjax.train.checkpoint import load_params

    if not os.path.isfile(path):
        raise ValueError(f"init_from must be a params.npz file, got {path!r}")
    _, abs_params, _ = nnx.split(nnx.eval_shape(base_model_fn), nnx.Param, ...)
    shardings = state_shardings(abs_params, mesh)
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(abs_params), shardings,
    )  # fmt: skip
    loaded = _flatten(load_params(path, target))
    flat = _flatten(params)
    for src, value in loaded.items():
        dst = src
        while dst not in flat and len(dst) < len(src) + 4:
            dst = (*dst[:-1], "base", dst[-1])
        if dst not in flat:
            raise ValueError(f"init_from: parameter {'/'.join(map(str, src))} has no place")
        if flat[dst].shape != value.shape:
            raise ValueError(
                f"init_from: {'/'.join(map(str, src))} has shape {value.shape}, the model "
                f"{flat[dst].shape}"
            )
        flat[dst] = jax.device_put(value.astype(flat[dst].dtype), flat[dst].sharding)
    return _unflatten(flat)


def build(config, workdir: str, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Everything a run needs, from a locked ConfigDict (see module docstring)."""
    import jax
    from flax import nnx

    from modjax.data import make_dataset
    from modjax.models import make_model
    from modjax.sharding import make_mesh
    from modjax.train.config import to_kwargs
    from modjax.train.loop import LoopConfig
    from modjax.train.optim import OptimizerConfig, count_by_label, make_optimizer, param_labels
    from modjax.train.step import (
        TaskConfig,
        init_train_state,
        make_eval_step,
        make_train_step,
        router_bias_mask,
    )

    loop = LoopConfig(**to_kwargs(config.train))
    task = TaskConfig(**to_kwargs(config.task))
    opt_kwargs = to_kwargs(config.optimizer)
    if opt_kwargs.get("decay_steps") == -1:  # cosine decay to the end of the run
        opt_kwargs["decay_steps"] = max(loop.num_steps - opt_kwargs.get("warmup_steps", 0), 1)
    opt_config = OptimizerConfig(**opt_kwargs)
    mesh_kwargs = to_kwargs(config.mesh)
    num_devices = mesh_kwargs.pop("num_devices", 0)  # 0: all devices
    devices = jax.devices()[:num_devices] if num_devices else None
    mesh = make_mesh(**mesh_kwargs, devices=devices)

    data = to_kwargs(config.data)
    name, batch_size = data.pop("name"), data.pop("batch_size")
    train_split, eval_split = data.pop("train_split", "train"), data.pop("eval_split", "")
    data_kwargs = data.pop("kwargs", {})
    if data:
        raise ValueError(f"unknown data config keys {sorted(data)}")
    nproc = jax.process_count()
    if batch_size % nproc:
        raise ValueError(f"data.batch_size={batch_size} is not divisible by {nproc} processes")
    seed = int(config.seed)  # each process reads its own shard (modjax.data)
    train_data = make_dataset(
        name, split=train_split, batch_size=batch_size // nproc, seed=seed, **data_kwargs
    )
    eval_data_fn = None
    if eval_split:

        def eval_data_fn():
            return make_dataset(
                name, split=eval_split, batch_size=batch_size // nproc, seed=seed, **data_kwargs
            )

    model_cfg = to_kwargs(config.model)
    model_name = model_cfg.pop("name")
    model_kwargs = _fill_from_data(model_cfg.pop("config"), train_data)
    if model_cfg:
        raise ValueError(f"unknown model config keys {sorted(model_cfg)}")
    surgery_kwargs = to_kwargs(config.surgery) if "surgery" in config else {}

    def model_fn():
        model = make_model(model_name, model_kwargs, rngs=nnx.Rngs(int(config.seed)))
        return apply_surgery(model, surgery_kwargs, int(config.seed))

    holder = {}

    def tx_fn(abs_params):
        holder["labels"] = param_labels(abs_params, opt_config)
        return make_optimizer(opt_config, holder["labels"])

    graphdef, state, tx, shardings = init_train_state(model_fn, tx_fn, mesh)
    init_from = str(config.get("init_from", "") or "")
    if init_from:
        base_fn = lambda: make_model(model_name, model_kwargs, rngs=nnx.Rngs(int(config.seed)))
        params = load_base_params(state.params, init_from, base_fn, mesh)
        state = state._replace(params=params)
        log(f"base parameters from {init_from}")
    _, _, abs_rest = nnx.split(nnx.eval_shape(model_fn), nnx.Param, ...)
    step_fn = make_train_step(
        graphdef, tx, task, labels=holder["labels"], bias_mask=router_bias_mask(abs_rest),
        bias_update_rate=loop.bias_update_rate,
    )  # fmt: skip
    train_step = jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings, None))
    eval_step = jax.jit(make_eval_step(graphdef, task))
    counts = count_by_label(state.params, holder["labels"])
    log(f"mesh {dict(mesh.shape)}; parameters by partition {counts}")
    return {
        "state": state, "train_step": train_step, "eval_step": eval_step,
        "train_data": train_data, "eval_data_fn": eval_data_fn, "mesh": mesh, "loop": loop,
        "graphdef": graphdef, "param_counts": counts, "task": task,
    }  # fmt: skip


def _token_key(task) -> str | None:
    """The batch key counted for tokens/s: an LM's inputs (classification: none)."""
    return task.input_key if task.name == "lm" else None


def run(config, workdir: str, *, step_callback=None, log: Callable[[str], None] = print) -> dict:
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints)."""
    import jax

    from modjax.train.checkpoint import CheckpointManager, install_preemption_handlers
    from modjax.train.loop import train_loop
    from modjax.train.metrics import MetricWriter

    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    parts = build(config, workdir, log=log)
    loop = parts["loop"]
    checkpoints = CheckpointManager(
        os.path.join(workdir, "checkpoints"), save_every=loop.checkpoint_every,
        keep=loop.keep_checkpoints, async_save=loop.async_checkpoint,
    )  # fmt: skip
    writer = MetricWriter(workdir)
    log(f"writing metrics to {writer.path} (TensorBoard: {os.path.join(workdir, 'tensorboard')})")
    preemption = install_preemption_handlers()
    try:
        state, summary = train_loop(
            state=parts["state"], train_step=parts["train_step"],
            eval_step=parts["eval_step"], train_data=parts["train_data"],
            eval_data_fn=parts["eval_data_fn"], mesh=parts["mesh"], loop=loop,
            checkpoints=checkpoints, writer=writer, preemption=preemption, log=log,
            step_callback=step_callback, token_key=_token_key(parts["task"]),
            progress_stream=sys.stderr if jax.process_index() == 0 else None,
        )  # fmt: skip
    finally:
        preemption.uninstall()
        writer.close()
        checkpoints.close()
    if not summary["preempted"]:
        from modjax.train.checkpoint import save_params

        save_params(os.path.join(workdir, "params.npz"), state.params)
    if loop.plots and not summary["preempted"]:
        summary["plots"] = _write_plots(workdir, log)
    summary["state"] = state
    log(
        f"done at step {summary['step']} ({summary['skipped']} skipped). Workdir {workdir}: "
        f"metrics {os.path.join(workdir, 'metrics.jsonl')}, checkpoints "
        f"{os.path.join(workdir, 'checkpoints')}, plots {os.path.join(workdir, 'plots')}, "
        f"final parameters {os.path.join(workdir, 'params.npz')}"
    )
    return summary


def _write_plots(workdir: str, log) -> list[str]:
    from modjax.train import plots

    try:
        return list(plots.plot_metrics(workdir) or [])
    except (OSError, ValueError) as err:  # plots are a convenience: never fail a run
        log(f"plots not written: {err}")
        return []


def main(argv: list[str] | None = None, *, step_callback=None) -> int:
    """Entry point of ``python -m modjax.train`` and the ``modjax`` command."""
    from modjax.train.config import apply_override, load_config, parse_overrides

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        flags, overrides = parse_overrides(argv)
        unknown = sorted(set(flags) - {"config", "workdir"})
        if unknown or "config" not in flags or "workdir" not in flags:
            raise ValueError(f"{USAGE}\n(unknown flags: {unknown})" if unknown else USAGE)
        config = load_config(flags["config"])
        for key, value in overrides:
            apply_override(config, key, value)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    maybe_initialize_distributed()
    try:
        summary = run(config, flags["workdir"], step_callback=step_callback)
    except FloatingPointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"step": summary["step"], "preempted": summary["preempted"]}))
    return 0


__all__ = [
    "apply_surgery",
    "build",
    "is_multi_process",
    "main",
    "maybe_initialize_distributed",
    "run",
]
