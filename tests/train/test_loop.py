"""The loop through the CLI entry point: non-finite steps stop the run with a clear
message or are skipped and counted, per config."""

import json
import os

from modjax.train.main import main

CONFIG = "experiments/moe_char_lm.py:tiny"
TINY = [
    "--config.data.batch_size=8",
    "--config.data.kwargs.seq_len=16",
    "--config.data.eval_split=",
    "--config.model.config.d_model=16",
    "--config.model.config.num_layers=1",
    "--config.model.config.num_heads=2",
    "--config.model.config.d_ff=32",
    "--config.model.config.sparse_kwargs={'num_experts': 2, 'k': 1, 'strategy': 'einsum'}",
    "--config.train.num_steps=6",
    "--config.train.log_every=3",
    "--config.train.async_checkpoint=false",
    "--config.train.plots=false",
    # an enormous step makes the weights overflow: the next loss is not finite
    "--config.optimizer.learning_rate=1e35",
    "--config.optimizer.warmup_steps=0",
    "--config.optimizer.grad_clip_norm=0.0",
]


def test_nonfinite_stop_names_the_step(tmp_path, capsys):
    args = ["--config", CONFIG, "--workdir", str(tmp_path), *TINY]
    rc = main([*args, "--config.train.on_nonfinite=stop"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "non-finite loss or gradients at step 2" in err
    assert "on_nonfinite=skip" in err


def test_nonfinite_skip_counts_and_finishes(tmp_path, capsys):
    args = ["--config", CONFIG, "--workdir", str(tmp_path), *TINY]
    assert main([*args, "--config.train.on_nonfinite=skip"]) == 0
    out = capsys.readouterr().out
    # a plain console line per log step: position, loss, skipped, rates (not every metric)
    assert "step 6/6 loss=" in out and "accuracy=" in out and "skipped=5" in out
    assert "steps/s" in out and "tok/s" in out and "moe/" not in out
    assert json.loads(out.strip().splitlines()[-1]) == {"step": 6, "preempted": False}
    records = [json.loads(line) for line in open(os.path.join(tmp_path, "metrics.jsonl"))]
    last = [r for r in records if "skipped" in r][-1]
    assert last["step"] == 6 and last["skipped"] == 5.0
    assert last["nonfinite"] == 1.0
    assert last["tokens_per_s"] > 0 and last["steps_per_s"] > 0
    ratio = last["tokens_per_s"] / last["steps_per_s"]
    assert abs(ratio - 8 * 16) < 1e-6 * ratio  # batch 8 x seq_len 16 tokens per step
