"""Resume: 20 steps equal, bit for bit, 10 steps killed by SIGTERM in a subprocess plus 10
resumed (params and data order); a checkpoint from 8 devices restores onto 2."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from modjax.train.config import apply_override, load_config
from modjax.train.main import build, run

CONFIG = "experiments/moe_char_lm.py:tiny"
TINY = {
    "data.batch_size": "8",
    "data.kwargs.seq_len": "16",
    "data.eval_split": "",
    "model.config.d_model": "16",
    "model.config.num_layers": "1",
    "model.config.num_heads": "2",
    "model.config.d_ff": "32",
    "model.config.sparse_kwargs": "{'num_experts': 2, 'k': 1, 'strategy': 'einsum'}",
    "train.num_steps": "20",
    "train.log_every": "5",
    "train.checkpoint_every": "100",
    "train.async_checkpoint": "false",
    "train.plots": "false",
}


def _np(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _config(**extra):
    c = load_config(CONFIG)
    for k, v in {**TINY, **extra}.items():
        apply_override(c, k, v)
    return c


def _args(workdir):
    return ["--config", CONFIG, "--workdir", workdir] + [
        f"--config.{k}={v}" for k, v in TINY.items()
    ]


KILLER = """
import os, signal, sys
from modjax.train.main import main
kill = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 10 else None
sys.exit(main(sys.argv[1:], step_callback=kill))
"""


def _last_data_state(workdir):
    from modjax.train.checkpoint import CheckpointManager

    mgr = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=100)
    step = mgr.latest_step()
    _, extra = mgr.restore(step)
    mgr.close()
    return step, extra["data"]


def test_sigterm_resume_is_bit_exact(tmp_path):
    ref = run(_config(), str(tmp_path / "ref"), log=lambda s: None)
    assert ref["step"] == 20 and not ref["preempted"]

    work = str(tmp_path / "killed")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *_args(work)], env=env, capture_output=True,
        text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "preempted: checkpoint saved at step 10" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"step": 10, "preempted": True}

    logs = []
    resumed = run(_config(), work, log=logs.append)
    assert "resumed from checkpoint at step 10" in logs
    assert resumed["step"] == 20
    for a, b in zip(jax.tree.leaves(ref["state"]), jax.tree.leaves(resumed["state"])):
        np.testing.assert_array_equal(_np(a), _np(b))
    ref_data, res_data = _last_data_state(str(tmp_path / "ref")), _last_data_state(work)
    assert ref_data == res_data and ref_data[0] == 20


def test_checkpoint_from_8_devices_restores_on_2(tmp_path):
    from modjax.train.checkpoint import CheckpointManager
    from modjax.train.loop import train_loop

    work = str(tmp_path)
    eight = run(
        _config(**{"train.num_steps": "4", "mesh.data": "2", "mesh.fsdp": "4"}), work,
        log=lambda s: None,
    )  # fmt: skip
    saved = eight["state"]
    assert len(saved.params["embed"]["embedding"].sharding.device_set) == 8

    cfg = _config(**{"train.num_steps": "4", "mesh.data": "1", "mesh.fsdp": "2",
                     "mesh.num_devices": "2"})  # fmt: skip
    parts = build(cfg, work, log=lambda s: None)
    logs = []
    with CheckpointManager(os.path.join(work, "checkpoints"), save_every=100) as mgr:
        state, summary = train_loop(
            state=parts["state"], train_step=parts["train_step"], eval_step=None,
            train_data=parts["train_data"], eval_data_fn=None, mesh=parts["mesh"],
            loop=parts["loop"], checkpoints=mgr, writer=None, log=logs.append,
        )  # fmt: skip
    assert "resumed from checkpoint at step 4" in logs and summary["step"] == 4
    emb = state.params["embed"]["embedding"]
    assert emb.sharding.device_set == set(jax.devices()[:2])
    assert emb.sharding.spec == parts["state"].params["embed"]["embedding"].sharding.spec
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(state)):
        np.testing.assert_array_equal(_np(a), _np(b))
    assert parts["train_data"].get_state()["batch"] == 4
