"""Checkpoints: round trips, keep-K, atomicity, resharding 8 -> 2 devices, preemption."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from modjax.train.checkpoint import (
    CheckpointManager,
    PreemptionWatcher,
    abstract_like,
    load_params,
    save_params,
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _state(scale=1.0):
    params = {
        "dense": {"w": jnp.arange(32.0).reshape(8, 4) * scale, "b": jnp.ones(4) * scale},
        "emb": (jnp.arange(6.0).reshape(3, 2) * scale).astype(jnp.bfloat16),
    }
    return {
        "step": jnp.int32(7),
        "params": params,
        "opt_state": optax.adamw(1e-3).init(params),
    }


def _assert_tree_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def _mesh(n):
    return jax.make_mesh(
        (n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n]
    )


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_save_every_keep_and_no_overwrite(tmp_path, async_save):
    with CheckpointManager(str(tmp_path), save_every=2, keep=2, async_save=async_save) as ckpt:
        assert ckpt.latest_step() is None
        assert not ckpt.save(1, _state(), {"data": {"epoch": 0}})  # not a multiple of 2
        assert ckpt.save(1, _state(1.0), {"data": {"epoch": 1}}, force=True)
        assert ckpt.save(2, _state(2.0), {"data": {"epoch": 2}})
        assert ckpt.save(4, _state(4.0), {"data": {"epoch": 4}, "config": {"lr": 0.1}})
        assert not ckpt.save(4, _state(9.0), force=True)  # a step is never overwritten
        ckpt.wait()
        assert ckpt.all_steps() == [2, 4] and ckpt.latest_step() == 4
        state, extra = ckpt.restore(target=abstract_like(_state()))
        _assert_tree_equal(state, _state(4.0))
        assert extra == {"data": {"epoch": 4}, "config": {"lr": 0.1}}
        state, extra = ckpt.restore(2, target=_state())
        _assert_tree_equal(state, _state(2.0))
        assert extra == {"data": {"epoch": 2}}
        with pytest.raises(FileNotFoundError, match="step=1"):
            ckpt.restore(1)
    # a new manager over the same directory sees the same checkpoints
    again = CheckpointManager(str(tmp_path), save_every=2)
    assert again.all_steps() == [2, 4]
    again.close()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        CheckpointManager(str(tmp_path), save_every=0)
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(str(tmp_path), save_every=1, keep=-1)
    with CheckpointManager(str(tmp_path), save_every=1) as ckpt:
        with pytest.raises(ValueError, match="extra"):
            ckpt.save(1, _state(), {"bad": object()})
        with pytest.raises(ValueError, match="step"):
            ckpt.save(-1, _state())
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore()


def test_half_written_tmp_dir_is_ignored(tmp_path):
    with CheckpointManager(str(tmp_path), save_every=1, async_save=False) as ckpt:
        ckpt.save(3, _state(3.0), {"data": 3})
    # what an interrupted save of step 5 leaves behind: a temporary directory
    partial = tmp_path / "5.orbax-checkpoint-tmp-1234567"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
    with CheckpointManager(str(tmp_path), save_every=1) as ckpt:
        assert ckpt.all_steps() == [3] and ckpt.latest_step() == 3
        state, extra = ckpt.restore(target=_state())
        _assert_tree_equal(state, _state(3.0))
        assert extra == {"data": 3}
        assert ckpt.save(5, _state(5.0), {"data": 5})  # the step can be saved again
        ckpt.wait()
        assert ckpt.latest_step() == 5
        _assert_tree_equal(ckpt.restore(target=_state())[0], _state(5.0))


def test_sharded_on_8_devices_restores_on_2(tmp_path):
    assert len(jax.devices()) >= 8
    mesh8, mesh2 = _mesh(8), _mesh(2)
    values = {
        "w": np.random.default_rng(0).standard_normal((16, 6)).astype(np.float32),
        "experts": np.arange(8 * 3 * 2, dtype=np.float32).reshape(8, 3, 2),
        "count": np.int32(11),
    }
    specs8 = {"w": P("data", None), "experts": P("data"), "count": P()}
    state = {k: jax.device_put(v, NamedSharding(mesh8, specs8[k])) for k, v in values.items()}
    assert len(state["w"].sharding.device_set) == 8
    with CheckpointManager(str(tmp_path), save_every=1) as ckpt:
        ckpt.save(1, state, {"mesh": "8"})
        specs2 = {"w": P(None, "data"), "experts": P("data"), "count": P()}
        target = {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh2, specs2[k]))
            for k, v in values.items()
        }
        restored, extra = ckpt.restore(target=target)
    assert extra == {"mesh": "8"}
    for k, v in values.items():
        assert restored[k].sharding == target[k].sharding
        assert restored[k].sharding.device_set == set(jax.devices()[:2])
        np.testing.assert_array_equal(np.asarray(restored[k]), v)


def test_killed_during_async_save_keeps_the_good_checkpoint(tmp_path):
    script = textwrap.dedent(
        f"""
        import os, sys
        import jax.numpy as jnp
        from modjax.train.checkpoint import CheckpointManager
        ckpt = CheckpointManager({str(tmp_path)!r}, save_every=1, async_save=True)
        ckpt.save(1, {{"w": jnp.full((256, 1024), 1.0)}}, {{"n": 1}}); ckpt.wait()
        ckpt.save(2, {{"w": jnp.full((4096, 1024), 2.0)}}, {{"n": 2}})
        os._exit(9)  # dies while (or just after) step 2 is written in the background
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=120
    )
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    with CheckpointManager(str(tmp_path), save_every=1) as ckpt:
        latest = ckpt.latest_step()
        assert latest in (1, 2)
        state, extra = ckpt.restore()
        assert extra == {"n": latest}
        assert float(state["w"].min()) == float(state["w"].max()) == float(latest)
        assert state["w"].shape == ((256, 1024) if latest == 1 else (4096, 1024))


def test_preemption_watcher_in_process():
    watcher = PreemptionWatcher()
    with watcher:
        assert watcher.installed and not watcher.requested
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not watcher.requested and time.time() < deadline:
            time.sleep(0.01)
        assert watcher.requested and watcher.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is not watcher._handle


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_saves_and_exits_cleanly_in_subprocess(tmp_path, sig):
    script = textwrap.dedent(
        f"""
        import sys, time
        import jax.numpy as jnp
        from modjax.train.checkpoint import CheckpointManager, install_preemption_handlers
        watcher = install_preemption_handlers()
        ckpt = CheckpointManager({str(tmp_path)!r}, save_every=1000)
        step = 0
        print("ready", flush=True)
        while True:
            step += 1
            time.sleep(0.01)
            if watcher.requested:
                ckpt.save(step, {{"step": jnp.int32(step)}}, {{"signal": watcher.signal_name}},
                          force=True)
                ckpt.close()
                print("saved", step, flush=True)
                sys.exit(0)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.2)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-2000:]
    step = int(out.split()[-1])
    assert step > 1
    with CheckpointManager(str(tmp_path), save_every=1000) as ckpt:
        assert ckpt.latest_step() == step
        state, extra = ckpt.restore()
        assert int(state["step"]) == step and extra == {"signal": signal.Signals(sig).name}


def test_save_and_load_params(tmp_path):
    path = str(tmp_path / "params.npz")
    params = _state(3.0)["params"]
    save_params(path, params)
    assert os.listdir(tmp_path) == ["params.npz"]  # no temporary file left behind
    loaded = load_params(path, abstract_like(params))
    _assert_tree_equal(loaded, params)
    assert loaded["emb"].dtype == jnp.bfloat16
    # onto a sharded target
    mesh = _mesh(2)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), params
    )
    assert load_params(path, target)["dense"]["w"].sharding == target["dense"]["w"].sharding
    wrong = {**params, "dense": {"w": jnp.zeros((4, 8)), "b": params["dense"]["b"]}}
    with pytest.raises(ValueError, match=r"\['dense'\]\['w'\].*\[4, 8\]"):
        load_params(path, wrong)
    with pytest.raises(ValueError, match="missing"):
        load_params(path, {**params, "missing": jnp.zeros(2)})
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        load_params(str(tmp_path / "nothing.npz"), params)
    # a failed save leaves the previous file intact
    with pytest.raises(ValueError, match="not an array"):
        save_params(path, {"ok": jnp.ones(2), "bad": object()})
    _assert_tree_equal(load_params(path, params), params)


def test_save_params_of_nnx_state(tmp_path):
    from flax import nnx

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    save_params(str(tmp_path / "p.npz"), state)
    other = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
    loaded = load_params(str(tmp_path / "p.npz"), nnx.state(other, nnx.Param))
    nnx.update(other, loaded)
    np.testing.assert_array_equal(other.kernel[...], model.kernel[...])


def test_preemption_is_agreed_across_processes():
    """Simulated 2-process run: only process A gets SIGTERM; A must not stop alone, and
    both stop at the same read (the allgather sees every process's flag)."""
    a, b = PreemptionWatcher(sync_every=2), PreemptionWatcher(sync_every=2)
    for w in (a, b):
        w._process_count = lambda: 2
        w._any_process = lambda flag: a._local or b._local  # what an allgather returns
    a.request("SIGTERM")
    assert not a.requested and not b.requested  # read 1: not a sync point
    assert a.requested and b.requested  # read 2: agreed
    assert a.requested and b.requested  # and it stays so
    assert a.signal_name == "SIGTERM" and b.signal_name is None
    with pytest.raises(ValueError, match="sync_every"):
        PreemptionWatcher(sync_every=0)


def test_async_save_survives_donated_buffers(tmp_path):
    """The train step donates the state right after save(): the save must have its copy."""
    state = {"w": jnp.arange(1024.0).reshape(32, 32), "n": jnp.int32(3)}
    with CheckpointManager(str(tmp_path), save_every=1, async_save=True) as ckpt:
        assert ckpt.save(1, state)
        for leaf in jax.tree.leaves(state):
            leaf.delete()  # what donation does to the old buffers
        ckpt.wait()
        restored, extra = ckpt.restore()
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(1024.0).reshape(32, 32))
    assert int(restored["n"]) == 3 and extra == {}


def test_data_state_in_extra_resumes_the_same_batches(tmp_path):
    from modjax.data import make_dataset

    def data():
        return make_dataset("rule_mixture", split="train", batch_size=2, seed=5, seq_len=4)

    run = data()
    for _ in range(3):
        next(run)
    with CheckpointManager(str(tmp_path), save_every=3) as ckpt:
        ckpt.save(3, {"step": jnp.int32(3)}, {"data": run.get_state()})
    expected = [next(run) for _ in range(4)]
    resumed = data()
    with CheckpointManager(str(tmp_path), save_every=3) as ckpt:
        _, extra = ckpt.restore()
    resumed.set_state(extra["data"])
    for want, got in zip(expected, (next(resumed) for _ in range(4))):
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])
