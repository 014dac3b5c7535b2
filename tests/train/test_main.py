"""The CLI leaves metrics, a checkpoint and plots in the workdir (the quickstart's
promise), and the console-script entry point is importable."""

import json
import os

from modjax.train.main import main

TINY = [
    "--config.data.batch_size=8",
    "--config.data.kwargs.seq_len=16",
    "--config.model.config.d_model=16",
    "--config.model.config.num_layers=1",
    "--config.model.config.num_heads=2",
    "--config.model.config.d_ff=32",
    "--config.model.config.sparse_kwargs={'num_experts': 2, 'k': 1, 'strategy': 'einsum'}",
    "--config.train.num_steps=30",
    "--config.train.log_every=10",
    "--config.train.eval_every=15",
    "--config.train.eval_steps=2",
    "--config.train.checkpoint_every=15",
]


def test_quickstart_workdir(tmp_path, capsys):
    work = str(tmp_path / "quickstart")
    rc = main(["--config", "experiments/moe_char_lm.py:tiny", "--workdir", work, *TINY])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"metrics {work}/metrics.jsonl" in out
    records = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    train = [r for r in records if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]  # loss falls on the character LM
    assert any("eval/loss" in r for r in records)
    assert any(k.startswith("expert_load/") for r in records for k in r)
    assert sorted(os.listdir(os.path.join(work, "checkpoints"))) == ["15", "30"]
    assert "loss.png" in os.listdir(os.path.join(work, "plots"))
    assert json.load(open(os.path.join(work, "config.json")))["train"]["num_steps"] == 30


def test_help():
    assert main(["--help"]) == 0
