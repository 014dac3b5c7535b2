"""The CLI leaves metrics, a checkpoint and plots in the workdir (the quickstart's
promise), and the console-script entry point is importable."""

import json
import os

import pytest

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


def test_init_from_puts_base_params_under_lora(tmp_path):
    import jax
    import numpy as np

    from modjax.train.checkpoint import save_params
    from modjax.train.config import apply_override, load_config
    from modjax.train.main import build

    def config(**over):
        c = load_config("experiments/lora_finetune.py:tiny")
        for k, v in over.items():
            apply_override(c, k, v)
        return c

    small = {"model.config.num_layers": "1", "model.config.d_model": "16", "data.eval_split": ""}
    base = build(config(**small, surgery="{}"), str(tmp_path), log=lambda s: None)
    kernel = base["state"].params["blocks"][0]["attention"]["query"]["kernel"]
    save_params(str(tmp_path / "params.npz"), jax.tree.map(lambda x: x + 1.0, base["state"].params))

    c = config(**small, init_from=str(tmp_path / "params.npz"))
    tuned = build(c, str(tmp_path), log=lambda s: None)["state"].params
    query = tuned["blocks"][0]["attention"]["query"]
    assert "base" in query and len(query) > 1  # the LoRA wrapper and its factors
    np.testing.assert_array_equal(np.asarray(query["base"]["kernel"]), np.asarray(kernel) + 1.0)
    bad = config(**small, init_from=str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="init_from"):
        build(bad, str(tmp_path), log=lambda s: None)
