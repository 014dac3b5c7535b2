"""The training loop: resume from the latest checkpoint (train state and data order),
step, log, evaluate, checkpoint, and stop cleanly on preemption (SIGTERM/SIGINT).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

from modjax.sharding import batch_sharding
from modjax.train.metrics import ProgressBar, is_terminal
from modjax.train.step import NONFINITE_POLICIES, TrainState


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The ``train`` section of an experiment config.

    Attributes:
      num_steps: total train steps of the run (a resumed run continues to it).
      log_every: steps between train metric writes.
      eval_every: steps between evaluations (0: only at the end); eval_steps: batches each.
      checkpoint_every: steps between checkpoints (one is always written at the end and
        on preemption); keep_checkpoints: how many to keep; async_checkpoint: write in
        the background.
      on_nonfinite: ``"skip"`` (drop the update, count it in ``skipped``) or ``"stop"``
        (raise FloatingPointError naming the step).
      bias_update_rate: aux-loss-free router bias step size (0: off).
      plots: write PNG plots of the metrics at the end.
    """

    num_steps: int = 100
    log_every: int = 10
    eval_every: int = 0
    eval_steps: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    on_nonfinite: str = "skip"
    bias_update_rate: float = 0.0
    plots: bool = True

    def __post_init__(self):
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}"
            )
        for name in ("num_steps", "log_every", "eval_steps", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.bias_update_rate, int | float) or self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {self.bias_update_rate!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ValueError(f"eval_every must be an int >= 0, got {self.eval_every!r}")


def global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """This process's numpy batch as global arrays sharded over the data axes."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def evaluate(eval_step, state, batches: Iterable[dict], mesh, num_batches: int) -> dict:
    """Mean of ``eval_step`` metrics over up to ``num_batches`` batches."""
    sums: dict[str, float] = {}
    n = 0
    for batch in batches:
        if n >= num_batches:
            break
        for k, v in _scalars(eval_step(state, global_batch(batch, mesh))).items():
            sums[k] = sums.get(k, 0.0) + v
        n += 1
    return {k: v / max(n, 1) for k, v in sums.items()}


def console_line(step: int, num_steps: int, scalars: dict[str, float]) -> str:
    """The plain progress line of a log step: position, loss, accuracy, skipped updates
    and rates, e.g. ``"step 50/500 loss=3.14 accuracy=0.25 19 steps/s 1.95e+04 tok/s"``
    (the other metrics go to ``metrics.jsonl`` only)."""
    parts = [f"step {step}/{num_steps}"]
    parts += [f"{k}={scalars[k]:.4g}" for k in ("loss", "accuracy") if k in scalars]
    if scalars.get("skipped"):
        parts.append(f"skipped={int(scalars['skipped'])}")
    parts.append(f"{scalars['steps_per_s']:.3g} steps/s")
    if "tokens_per_s" in scalars:
        parts.append(f"{scalars['tokens_per_s']:.3g} tok/s")
    return " ".join(parts)


def nonfinite_message(step: int, metrics: dict[str, float]) -> str:
    return (
        f"non-finite loss or gradients at step {step} (loss={metrics.get('loss')}, "
        f"grad_norm={metrics.get('grad_norm')}); the update was not applied. Lower the "
        "learning rate, enable clipping (optimizer.grad_clip_norm), or set "
        "--config.train.on_nonfinite=skip to skip such steps."
    )


def train_loop(
    *,
    state: TrainState,
    train_step: Callable,
    eval_step: Callable | None,
    train_data: Iterator[dict],
    eval_data_fn: Callable[[], Iterable[dict]] | None,
    mesh,
    loop: LoopConfig,
    checkpoints,
    writer,
    preemption=None,
    log: Callable[[str], None] = print,
    step_callback: Callable[[int], None] | None = None,
    token_key: str | None = None,
    progress_stream=None,
) -> tuple[TrainState, dict[str, Any]]:
    """Run ``train_step`` until ``loop.num_steps``, resuming from ``checkpoints``.

    Args:
      state: the freshly initialised TrainState (also the restore target: its shardings
        are the ones the restored arrays get, whatever mesh wrote the checkpoint).
      train_step, eval_step: jitted steps (``make_train_step`` / ``make_eval_step``).
      train_data: iterator of numpy batches with ``get_state()``/``set_state()``.
      eval_data_fn: a fresh eval iterable (None: no evaluation).
      checkpoints: a ``CheckpointManager``; writer: a ``MetricWriter``.
      preemption: object whose ``.requested`` turns True on SIGTERM (None: never).
      step_callback: called with the step number after each step (tests, profiling).
      token_key: batch key whose elements count as tokens, for ``tokens_per_s`` in
        the metrics and the progress bar (None: no token rate).
      progress_stream: where a TTY gets a live progress bar (steps/s, tokens/s, loss);
        it then replaces the per-``log_every`` train lines on the console (the metrics
        file still gets them). Not a TTY, or None: plain train lines only.

    Returns:
      ``(state, summary)`` where summary holds ``"step"``, ``"preempted"``,
      ``"skipped"``, the last train metrics and the last eval metrics.
    """
    latest = checkpoints.latest_step()
    if latest is not None:
        restored, extra = checkpoints.restore(latest, target=state._asdict())
        state = TrainState(**restored)
        if extra and "data" in extra and hasattr(train_data, "set_state"):
            train_data.set_state(extra["data"])
        log(f"resumed from checkpoint at step {latest}")
    step = int(state.step)
    summary: dict[str, Any] = {"preempted": False, "train": {}, "eval": {}}

    def save(force: bool):
        extra = {"data": train_data.get_state()} if hasattr(train_data, "get_state") else {}
        checkpoints.save(step, state._asdict(), extra, force=force)

    def run_eval():
        if eval_step is None or eval_data_fn is None:
            return
        metrics = evaluate(eval_step, state, eval_data_fn(), mesh, loop.eval_steps)
        writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        summary["eval"] = metrics
        say(f"step {step} eval " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    pending = None  # the previous step's metrics, checked after the next is dispatched
    t0, t_steps, t_tokens = time.perf_counter(), 0, 0
    on_terminal = progress_stream is not None and is_terminal(progress_stream)
    bar = ProgressBar(loop.num_steps, initial=step, stream=progress_stream) if on_terminal else None
    loss = None  # the last logged loss, shown by the bar between log steps (no device sync)

    def say(message: str):
        if bar is not None:
            bar.write(message)
        else:
            log(message)

    def check(prev_step, metrics):
        if loop.on_nonfinite == "stop" and float(metrics["nonfinite"]):
            checkpoints.wait()
            raise FloatingPointError(nonfinite_message(prev_step, _scalars(metrics)))

    with jax.set_mesh(mesh):
        try:
            while step < loop.num_steps:
                local = next(train_data)
                # each process holds its own shard of the global batch
                tokens = np.size(local[token_key]) * jax.process_count() if token_key else 0
                state, metrics = train_step(state, global_batch(local, mesh))
                step += 1
                t_steps += 1
                t_tokens += tokens
                if pending is not None:
                    check(*pending)
                pending = (step, metrics)
                if step % loop.log_every == 0 or step == loop.num_steps:
                    check(*pending)
                    scalars = _scalars(metrics)
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    scalars["steps_per_s"] = t_steps / elapsed
                    if token_key:
                        scalars["tokens_per_s"] = t_tokens / elapsed
                    scalars["skipped"] = float(state.skipped)
                    t0, t_steps, t_tokens = time.perf_counter(), 0, 0
                    writer.write(step, scalars)
                    if "expert_load" in metrics and hasattr(writer, "write_array"):
                        writer.write_array(step, "expert_load", np.asarray(metrics["expert_load"]))
                    summary["train"] = scalars
                    loss = scalars.get("loss")
                    if bar is None:  # the bar shows rates and loss live instead
                        log(console_line(step, loop.num_steps, scalars))
                if bar is not None:
                    bar.update(step, loss=loss, tokens=tokens)
                if step_callback is not None:
                    step_callback(step)
                if loop.eval_every and step % loop.eval_every == 0 and step < loop.num_steps:
                    run_eval()
                if preemption is not None and preemption.requested:
                    check(*pending)
                    save(force=True)
                    checkpoints.wait()
                    summary["preempted"] = True
                    say(f"preempted: checkpoint saved at step {step}; rerun the command to resume")
                    break
                if step % loop.checkpoint_every == 0 and step < loop.num_steps:
                    save(force=False)
            if pending is not None:
                check(*pending)
            if not summary["preempted"]:
                if latest != step:
                    save(force=True)
                run_eval()
            checkpoints.wait()
        finally:
            if bar is not None:
                bar.close()
    summary["step"] = step
    summary["skipped"] = int(state.skipped)
    return state, summary


__all__ = [
    "LoopConfig",
    "console_line",
    "evaluate",
    "global_batch",
    "nonfinite_message",
    "train_loop",
]
