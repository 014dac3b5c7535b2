"""Metric logging: JSON lines and TensorBoard, and a progress bar.

``MetricWriter`` appends one JSON object per call to ``<workdir>/metrics.jsonl``
(flushed at once, so a crash loses at most the line being written) and mirrors scalars,
histograms and per-layer arrays to TensorBoard event files. A resumed run appends to the
same file; readers keep the last record of a repeated step.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from modjax.files import atomic_write_bytes

METRICS_FILE = "metrics.jsonl"
ARRAYS_DIR = "arrays"


def _is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def _json_float(value: Any) -> float | None:
    value = float(np.asarray(value))
    return value if math.isfinite(value) else None


class MetricWriter:
    """Writes scalars, histograms and arrays per step to JSONL and TensorBoard.

    Args:
      workdir: directory of ``metrics.jsonl``, ``arrays/`` and the TensorBoard events
        (``tensorboard/``); created if missing.
      tensorboard: also write TensorBoard event files (tensorboardX).
      enabled: write at all (default: only JAX process 0 writes).

    JSONL records are ``{"step": int, name: value, ...}``; non-finite values are
    written as ``null`` (strict JSON). ``write_array(step, "expert_load", a)`` with a
    [L, E] array adds ``"expert_load/layer_{i}": [E floats]`` fields and keeps the
    latest array in ``arrays/expert_load.npy``.

    Example::

      with MetricWriter(workdir) as w:
          w.write(step, {"loss": 2.3, "eval/loss": 2.5})
    """

    def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool | None = None):
        if not isinstance(workdir, str | os.PathLike) or not str(workdir):
            raise ValueError(f"workdir must be a directory path, got {workdir!r}")
        self.workdir = os.fspath(workdir)
        self.enabled = _is_main_process() if enabled is None else bool(enabled)
        self.path = os.path.join(self.workdir, METRICS_FILE)
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(self.workdir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.workdir, "tensorboard"))

    def _record(self, record: dict) -> None:
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    @staticmethod
    def _check_step(step: Any) -> int:
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        return int(step)

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Write scalar metrics (floats, numpy or jax scalars) of ``step``."""
        step = self._check_step(step)
        if not isinstance(scalars, Mapping):
            raise ValueError(f"scalars must be a dict of name -> number, got {scalars!r}")
        values = {}
        for name, value in scalars.items():
            if not isinstance(name, str) or name == "step":
                raise ValueError(f"scalar names must be strings other than 'step', got {name!r}")
            if np.ndim(value) != 0:
                raise ValueError(f"scalar {name!r} must be a number, got shape {np.shape(value)}")
            values[name] = _json_float(value)
        if not self.enabled:
            return
        self._record({"step": step, **values})
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, float("nan") if value is None else value, step)

    def write_histogram(self, step: int, name: str, values: Any) -> None:
        """A TensorBoard histogram of ``values`` (any shape), and its summary in JSONL
        (``name/mean``, ``name/min``, ``name/max``)."""
        step = self._check_step(step)
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size == 0:
            raise ValueError(f"histogram {name!r} needs at least one value")
        if not self.enabled:
            return
        finite = values[np.isfinite(values)]
        summary = {
            f"{name}/{stat}": _json_float(fn(finite)) if finite.size else None
            for stat, fn in (("mean", np.mean), ("min", np.min), ("max", np.max))
        }
        self._record({"step": step, **summary})
        if self._tb is not None and finite.size:
            self._tb.add_histogram(name, finite, step)

    def write_array(self, step: int, name: str, array: Any) -> None:
        """A per-layer array, e.g. expert load [L, E] (a [E] array is one layer).

        JSONL gets ``"{name}/layer_{i}": [...]`` per row; ``arrays/{name}.npy`` holds the
        latest array (written atomically); TensorBoard gets a histogram per layer and
        ``{name}/layer_{i}/max_over_mean`` (1.0 is perfectly balanced).
        """
        step = self._check_step(step)
        array = np.asarray(array, dtype=np.float64)
        if array.ndim == 1:
            array = array[None]
        if array.ndim != 2 or array.size == 0:
            raise ValueError(f"array {name!r} must be [E] or [L, E], got shape {array.shape}")
        if not self.enabled:
            return
        record = {f"{name}/layer_{i}": [_json_float(v) for v in row] for i, row in enumerate(array)}
        self._record({"step": step, **record})
        directory = os.path.join(self.workdir, ARRAYS_DIR)
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, f"{name.replace('/', '_')}.npy")
        buffer = io.BytesIO()
        np.save(buffer, array)
        atomic_write_bytes(target, buffer.getvalue())
        if self._tb is not None:
            for i, row in enumerate(array):
                self._tb.add_histogram(f"{name}/layer_{i}", row, step)
                mean = float(np.mean(row))
                if mean > 0:
                    self._tb.add_scalar(
                        f"{name}/layer_{i}/max_over_mean", float(row.max()) / mean, step
                    )

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files (further writes raise)."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        self._file, self._tb = None, None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (file or workdir), one per step, by step.

    A step written twice (a run resumed from an earlier checkpoint) keeps its last
    record merged over earlier ones; a torn last line (a crash mid-write) is skipped.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file at {path!r}")
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                continue
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def is_terminal(stream) -> bool:
    """Whether ``stream`` is a terminal a bar can be drawn on (a TTY with a width; a
    pseudo-terminal of width 0 would show nothing)."""
    if not getattr(stream, "isatty", lambda: False)():
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return True  # a TTY-like stream without a file descriptor (tests)


class ProgressBar:
    """A tqdm bar showing steps/s, tokens/s and the loss; plain lines when not a TTY.

    Args:
      total: the last step.
      initial: the step training starts (or resumes) from.
      desc: the bar's label.
      stream: where to write (default ``sys.stderr``).
      quiet: write nothing at all.
      interval_s: without a TTY, the least seconds between two plain lines.

    Example::

      bar = ProgressBar(num_steps, initial=step)
      bar.update(step, loss=float(loss), tokens=batch_size * seq_len)
      bar.close()
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        desc: str = "train",
        stream=None,
        quiet: bool = False,
        interval_s: float = 30.0,
    ):
        if isinstance(total, bool) or not isinstance(total, int) or total < 0:
            raise ValueError(f"total must be a non-negative int, got {total!r}")
        if not isinstance(initial, int) or not 0 <= initial <= total:
            raise ValueError(f"initial must be an int in [0, total={total}], got {initial!r}")
        self.total, self.desc, self.quiet = total, desc, bool(quiet)
        self.stream = sys.stderr if stream is None else stream
        self.interval_s = float(interval_s)
        self.step, self.loss = initial, None
        self.steps_per_s = self.tokens_per_s = 0.0
        self._last_time = self._last_print = time.perf_counter()
        self._bar = None
        if not self.quiet and is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, file=self.stream)

    def update(self, step: int, loss: float | None = None, tokens: int | None = None) -> None:
        """Move to ``step``; ``tokens``: tokens processed since the previous update."""
        now = time.perf_counter()
        dt = max(now - self._last_time, 1e-9)
        done = step - self.step
        if done > 0:
            self.steps_per_s = done / dt
            self.tokens_per_s = (tokens or 0) / dt
            self._last_time = now
        self.step = step
        self.loss = None if loss is None else float(loss)
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(max(done, 0))
            self._bar.set_postfix_str(self.postfix(), refresh=False)
        elif now - self._last_print >= self.interval_s or step >= self.total:
            self._last_print = now
            self.stream.write(f"{self.desc} {step}/{self.total} {self.postfix()}\n")
            self.stream.flush()

    def postfix(self) -> str:
        """The rates and loss as text, e.g. ``"12.3 steps/s 4.1k tok/s loss 2.345"``."""
        parts = [f"{self.steps_per_s:.3g} steps/s"]
        if self.tokens_per_s:
            parts.append(f"{self.tokens_per_s / 1e3:.3g}k tok/s")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        return " ".join(parts)

    def write(self, message: str) -> None:
        """A line of text above the bar (or on the stream when there is no bar)."""
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["METRICS_FILE", "MetricWriter", "ProgressBar", "is_terminal", "read_metrics"]
