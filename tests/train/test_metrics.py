"""MetricWriter (JSONL + TensorBoard), read_metrics, ProgressBar and the PNG plots."""

import io
import json
import math
import os
import struct

import numpy as np
import pytest

from modjax.train.metrics import MetricWriter, ProgressBar, read_metrics
from modjax.train.plots import layer_arrays, plot_heatmap, plot_metrics


def _lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_write_jsonl_flushes_and_appends(tmp_path):
    workdir = str(tmp_path / "run")
    writer = MetricWriter(workdir, tensorboard=False)
    writer.write(1, {"loss": np.float32(2.5), "eval/loss": 3.0})
    # flushed at once: readable while the writer is open
    assert _lines(workdir) == [{"step": 1, "loss": 2.5, "eval/loss": 3.0}]
    writer.write(2, {"loss": float("nan")})
    writer.close()
    again = MetricWriter(workdir, tensorboard=False)  # a resumed run appends
    again.write(3, {"loss": 1.0})
    again.close()
    assert _lines(workdir) == [
        {"step": 1, "loss": 2.5, "eval/loss": 3.0},
        {"step": 2, "loss": None},
        {"step": 3, "loss": 1.0},
    ]


def test_write_rejects_bad_input(tmp_path):
    with MetricWriter(str(tmp_path), tensorboard=False) as writer:
        with pytest.raises(ValueError, match="step"):
            writer.write(-1, {"loss": 1.0})
        with pytest.raises(ValueError, match="'loss'.*shape"):
            writer.write(1, {"loss": np.ones(3)})
        with pytest.raises(ValueError, match="'step'"):
            writer.write(1, {"step": 1.0})
        with pytest.raises(ValueError, match=r"\[L, E\]"):
            writer.write_array(1, "expert_load", np.ones((2, 2, 2)))
    assert not os.path.exists(tmp_path / "metrics.jsonl") or _lines(str(tmp_path)) == []


def test_arrays_histograms_and_tensorboard(tmp_path):
    load = np.array([[0.5, 0.25, 0.25, 0.0], [0.1, 0.2, 0.3, 0.4]])
    with MetricWriter(str(tmp_path)) as writer:
        writer.write(5, {"loss": 1.5})
        writer.write_array(5, "expert_load", load)
        writer.write_histogram(5, "router/logits", [1.0, 2.0, 3.0, float("inf")])
    lines = _lines(str(tmp_path))
    assert lines[1] == {"step": 5, "expert_load/layer_0": load[0].tolist(),
                        "expert_load/layer_1": load[1].tolist()}  # fmt: skip
    assert lines[2] == {"step": 5, "router/logits/mean": 2.0, "router/logits/min": 1.0,
                        "router/logits/max": 3.0}  # fmt: skip
    np.testing.assert_array_equal(np.load(tmp_path / "arrays" / "expert_load.npy"), load)
    events = [f for f in os.listdir(tmp_path / "tensorboard") if "tfevents" in f]
    assert events and os.path.getsize(tmp_path / "tensorboard" / events[0]) > 100

    scalars, histograms = _read_events(str(tmp_path / "tensorboard" / events[0]))
    assert scalars["loss"] == [(5, 1.5)]
    assert scalars["expert_load/layer_0/max_over_mean"] == [(5, 2.0)]
    assert {"expert_load/layer_0", "expert_load/layer_1", "router/logits"} <= histograms


def _read_events(path):
    """Scalars (tag -> [(step, value)]) and histogram tags of a TensorBoard event file
    (records: uint64 length, uint32 crc, payload, uint32 crc)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars, histograms = {}, set()
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        event = Event.FromString(data[pos + 12 : pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            if value.HasField("histo"):
                histograms.add(value.tag)
            elif value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars, histograms


def test_disabled_writer_writes_nothing(tmp_path):
    with MetricWriter(str(tmp_path / "w"), enabled=False) as writer:
        writer.write(1, {"loss": 1.0})
        writer.write_array(1, "expert_load", np.ones(3))
    assert not os.path.exists(tmp_path / "w")


def test_read_metrics_merges_repeated_steps_and_skips_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 2, "loss": 5.0}\n{"step": 1, "loss": 6.0}\n'
        '{"step": 2, "loss": 4.0, "eval/loss": 4.5}\n{"step": 3, "lo'
    )
    assert read_metrics(str(tmp_path)) == [
        {"step": 1, "loss": 6.0},
        {"step": 2, "loss": 4.0, "eval/loss": 4.5},
    ]
    with pytest.raises(FileNotFoundError):
        read_metrics(str(tmp_path / "none"))


def test_progress_bar_plain_lines_without_tty():
    stream = io.StringIO()  # not a TTY: plain lines, no tqdm
    bar = ProgressBar(10, stream=stream, interval_s=0.0)
    bar.update(5, loss=2.0, tokens=500)
    assert bar.steps_per_s > 0 and bar.tokens_per_s > 0
    assert math.isclose(bar.tokens_per_s / bar.steps_per_s, 100.0, rel_tol=1e-6)
    bar.update(10, loss=1.25, tokens=500)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("train 10/10")
    assert "steps/s" in lines[-1] and "tok/s" in lines[-1] and "loss 1.25" in lines[-1]
    quiet = io.StringIO()
    bar = ProgressBar(10, stream=quiet, quiet=True)
    bar.update(3, loss=1.0)
    assert quiet.getvalue() == ""
    with pytest.raises(ValueError, match="initial"):
        ProgressBar(10, initial=11)


def test_progress_bar_tqdm_on_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    with ProgressBar(4, stream=stream, desc="fit") as bar:
        bar.update(2, loss=0.5, tokens=64)
        bar.write("step 2 eval loss=0.6")
    assert "fit" in stream.getvalue() and "2/4" in stream.getvalue()
    assert "step 2 eval loss=0.6\n" in stream.getvalue()


def test_plots_from_metrics(tmp_path):
    with MetricWriter(str(tmp_path), tensorboard=False) as writer:
        for step in range(1, 21):
            writer.write(step, {"loss": 3.0 / step, "accuracy": step / 20})
            if step % 10 == 0:
                writer.write(step, {"eval/loss": 3.5 / step})
        writer.write_array(20, "expert_load", np.array([[0.7, 0.1, 0.1, 0.1], [0.25] * 4]))
    paths = plot_metrics(str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["expert_load.png", "loss.png", "metrics.png"]
    for p in paths:
        assert os.path.dirname(p) == str(tmp_path / "plots")
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(tmp_path / "plots") if "tmp" in f]
    step, array = layer_arrays(read_metrics(str(tmp_path)))["expert_load"]
    assert step == 20 and array.shape == (2, 4) and array[0, 0] == 0.7


def test_heatmap_from_saved_array_only(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "arrays").mkdir()
    np.save(tmp_path / "arrays" / "expert_load.npy", np.ones((3, 8)))
    names = sorted(os.path.basename(p) for p in plot_metrics(str(tmp_path), out_dir=str(tmp_path)))
    assert names == ["expert_load.png", "loss.png", "metrics.png"]
    with pytest.raises(ValueError, match=r"\[L, E\]"):
        plot_heatmap(np.ones((2, 2, 2)), str(tmp_path / "x.png"))
