"""PNG plots of a run from its ``metrics.jsonl``: loss curves, other metrics, and
heatmaps of per-layer arrays such as expert load [L, E].

Uses matplotlib's Agg backend (no display needed). Every PNG is written to a temporary
file and renamed, so a plot is either the old one or the new one, never half.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from modjax.files import atomic_write_bytes
from modjax.train.metrics import ARRAYS_DIR, read_metrics

PLOTS_DIR = "plots"
_LAYER_FIELD = re.compile(r"^(?P<name>.+)/layer_(?P<layer>\d+)$")
_MAX_PANELS = 16


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [
        (r["step"], r[key])
        for r in records
        if isinstance(r.get(key), int | float) and r[key] is not None
    ]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps), np.asarray(values, dtype=np.float64)


def scalar_keys(records: list[dict]) -> list[str]:
    """Names of the scalar series in ``records`` (not ``step``), in first-seen order."""
    keys: dict[str, None] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                keys[key] = None
    return list(keys)


def layer_arrays(records: list[dict]) -> dict[str, tuple[int, np.ndarray]]:
    """Array name -> (step, [L, E] array) of the last record holding its
    ``"{name}/layer_{i}"`` fields."""
    out: dict[str, tuple[int, np.ndarray]] = {}
    for record in records:
        rows: dict[str, dict[int, list]] = {}
        for key, value in record.items():
            match = _LAYER_FIELD.match(key)
            if match and isinstance(value, list):
                rows.setdefault(match["name"], {})[int(match["layer"])] = value
        for name, layers in rows.items():
            ordered = [layers[i] for i in sorted(layers)]
            if len({len(r) for r in ordered}) == 1:
                array = np.asarray(
                    [[np.nan if v is None else v for v in r] for r in ordered], np.float64
                )
                out[name] = (record["step"], array)
    return out


def plot_losses(records: list[dict], path: str) -> str | None:
    """Train and eval loss curves (``loss``/``eval/loss`` and other ``*loss`` keys)."""
    keys = [k for k in scalar_keys(records) if k.rsplit("/", 1)[-1].endswith("loss")]
    if not keys:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    # a train series and its eval twin share a colour: solid train, dashed eval
    bases = list(dict.fromkeys(k.removeprefix("eval/") for k in keys))
    for i, base in enumerate(bases):
        color = f"C{i % 10}"
        for key, style in ((base, "-"), (f"eval/{base}", "--o")):
            if key in keys:
                steps, values = _series(records, key)
                ax.plot(steps, values, style, color=color, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_scalars(records: list[dict], path: str, keys: Sequence[str] | None = None) -> str | None:
    """One small panel per scalar series (at most 16), e.g. accuracy, grad_norm."""
    keys = list(keys if keys is not None else scalar_keys(records))[:_MAX_PANELS]
    if not keys:
        return None
    plt = _pyplot()
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        steps, values = _series(records, key)
        ax.plot(steps, values, "-o" if len(steps) < 20 else "-", markersize=2)
        ax.set_title(key, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_heatmap(array: Any, path: str, *, title: str = "expert load") -> str:
    """A heatmap of a [L, E] array (rows: layers, columns: experts)."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"array must be [L, E], got shape {array.shape}")
    plt = _pyplot()
    layers, experts = array.shape
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * experts + 2), max(2.5, 0.45 * layers + 1.5)))
    image = ax.imshow(array, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(experts))
    ax.set_yticks(range(layers))
    ax.set_title(title)
    return _save(fig, path)


def plot_metrics(workdir: str, *, out_dir: str | None = None) -> list[str]:
    """Write the plots of ``<workdir>/metrics.jsonl`` into ``out_dir``.

    Args:
      workdir: a run's directory (``metrics.jsonl``, maybe ``arrays/*.npy``).
      out_dir: where PNGs go (default ``<workdir>/plots``).

    Returns:
      The paths written: ``loss.png``, ``metrics.png``, and ``{name}.png`` per layer
      array (from the last JSONL record with ``{name}/layer_{i}`` fields, else from
      ``arrays/{name}.npy``).
    """
    records = read_metrics(workdir)
    out_dir = os.path.join(workdir, PLOTS_DIR) if out_dir is None else out_dir
    os.makedirs(out_dir, exist_ok=True)
    written = [
        plot_losses(records, os.path.join(out_dir, "loss.png")),
        plot_scalars(records, os.path.join(out_dir, "metrics.png")),
    ]
    arrays = {
        name: (f"{name} (step {step})", a) for name, (step, a) in layer_arrays(records).items()
    }
    array_dir = os.path.join(workdir, ARRAYS_DIR)
    if os.path.isdir(array_dir):
        for file in sorted(os.listdir(array_dir)):
            name = file[: -len(".npy")]
            if file.endswith(".npy") and not file.endswith(".tmp.npy") and name not in arrays:
                arrays[name] = (name, np.load(os.path.join(array_dir, file)))
    for name, (title, array) in arrays.items():
        file = re.sub(r"[^A-Za-z0-9_.-]", "_", name) + ".png"
        written.append(plot_heatmap(array, os.path.join(out_dir, file), title=title))
    return [p for p in written if p is not None]


__all__ = [
    "PLOTS_DIR",
    "layer_arrays",
    "plot_heatmap",
    "plot_losses",
    "plot_metrics",
    "plot_scalars",
    "scalar_keys",
]
