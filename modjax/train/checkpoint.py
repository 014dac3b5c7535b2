"""Checkpoints (orbax), preemption handling, and parameter export.

``CheckpointManager`` wraps ``orbax.checkpoint.CheckpointManager``: each step is a
directory holding the train state (arrays, written shard by shard) and a JSON item
(data iterator state, config, anything small). Orbax writes a step into a temporary
directory and renames it when complete, so an interrupted save never replaces or
corrupts a good checkpoint; leftovers of interrupted saves are ignored and cleaned up.
Restoring against a ``target`` of ``jax.ShapeDtypeStruct`` with shardings places every
array on the target's mesh, whatever mesh or device count wrote it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from modjax.files import atomic_save_npz
from modjax.typing import PyTree

_STATE, _EXTRA = "state", "extra"


def abstract_like(tree: PyTree) -> PyTree:
    """``jax.ShapeDtypeStruct`` leaves (with their shardings) of a pytree of arrays;
    ShapeDtypeStruct leaves are kept as they are."""

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        x = np.asarray(x)
        return jax.ShapeDtypeStruct(x.shape, x.dtype)

    return jax.tree.map(leaf, tree)


class CheckpointManager:
    """Periodic, asynchronous, atomic checkpoints of a train state plus JSON extras.

    Args:
      directory: where step directories live (created if missing).
      save_every: ``save(step, ...)`` writes only when ``step % save_every == 0``
        (or ``force=True``).
      keep: how many of the most recent checkpoints to keep (older ones are deleted).
      async_save: write in a background thread (``wait()`` blocks until done).

    Example::

      ckpt = CheckpointManager(workdir + "/checkpoints", save_every=100)
      ckpt.save(step, state, {"data": data.get_state()})
      state, extra = ckpt.restore(target=abstract_like(state))
    """

    def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
        for name, value in (("save_every", save_every), ("keep", keep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(directory, str | os.PathLike) or not str(directory):
            raise ValueError(f"directory must be a path, got {directory!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every, self.keep, self.async_save = save_every, keep, bool(async_save)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=self.async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(_STATE, _EXTRA)
        )

    def all_steps(self) -> list[int]:
        """The steps of complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        return self._manager.latest_step()

    def save(
        self, step: int, state: PyTree, extra: dict | None = None, *, force: bool = False
    ) -> bool:
        """Save ``state`` (pytree of arrays) and ``extra`` (JSON data) at ``step``.

        Returns whether a checkpoint was started: False when ``step`` is not a multiple
        of ``save_every`` (and not ``force``), or when ``step`` already has one (an
        existing checkpoint is never overwritten).
        """
        if isinstance(step, bool) or not isinstance(step, int | np.integer) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        step = int(step)
        extra = {} if extra is None else extra
        if not isinstance(extra, dict):
            raise ValueError(f"extra must be a dict of JSON data or None, got {type(extra)}")
        try:
            json.dumps(extra)
        except (TypeError, ValueError) as err:
            raise ValueError(f"extra must be JSON-serializable: {err}") from None
        if step in self._manager.all_steps():
            return False
        if not force and step % self.save_every:
            return False
        args = ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(extra)}
        )
        return bool(self._manager.save(step, args=args, force=True))

    def restore(
        self, step: int | None = None, *, target: PyTree | None = None
    ) -> tuple[PyTree, dict]:
        """``(state, extra)`` of checkpoint ``step`` (default: the latest).

        Args:
          step: which checkpoint; None: the latest.
          target: the pytree structure to restore into, with ``jax.ShapeDtypeStruct``
            (or array) leaves; their shardings say where the restored arrays go, so a
            checkpoint written on one mesh restores onto another. None: as saved (the
            saving devices must exist).

        Raises:
          FileNotFoundError: there is no checkpoint (at ``step``).
        """
        self.wait()
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
            step = steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step={step!r} in {self.directory}; available: {steps}"
            )
        state_args = (
            ocp.args.StandardRestore(abstract_like(target))
            if target is not None
            else ocp.args.StandardRestore()
        )
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{_STATE: state_args, _EXTRA: ocp.args.JsonRestore()})
        )
        return restored[_STATE], dict(restored[_EXTRA] or {})

    def wait(self) -> None:
        """Block until any asynchronous save has finished writing."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager's threads."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _any_process(flag: bool) -> bool:
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.asarray(flags).any())


class PreemptionWatcher:
    """Turns SIGTERM and SIGINT into a flag the train loop polls (``.requested``).

    The first signal only sets the flag, so the loop can save a checkpoint and exit
    cleanly; a second SIGINT (Ctrl-C twice) restores Python's handler and raises
    KeyboardInterrupt at once. Handlers can only be installed from the main thread;
    elsewhere the watcher stays passive (``.installed`` is False).

    With several JAX processes, a signal may reach them at different steps, and a
    process that stops alone would leave the others waiting in a collective. So there
    ``requested`` is agreed: every ``sync_every``-th read gathers all processes' flags
    (a tiny collective) and all of them see True from the same read on. This needs
    every process to read ``requested`` the same number of times (once per step).

    Args:
      sync_every: reads between two agreements in multi-process runs.

    Attributes:
      requested: whether a stop signal arrived (on any process, when agreed).
      signal_name: which signal this process got (``"SIGTERM"``/``"SIGINT"``), or None.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, *, sync_every: int = 1):
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"sync_every must be a positive int, got {sync_every!r}")
        self.sync_every = sync_every
        self.signal_name: str | None = None
        self.installed = False
        self._local = False
        self._agreed = False
        self._reads = 0
        self._previous: dict[int, Any] = {}
        self._process_count = jax.process_count
        self._any_process = _any_process

    @property
    def requested(self) -> bool:
        if self._process_count() == 1:
            return self._local
        if not self._agreed:
            self._reads += 1
            if self._reads % self.sync_every == 0:
                self._agreed = self._any_process(self._local)
        return self._agreed

    def request(self, signal_name: str | None = None) -> None:
        """Ask for a stop without a signal (e.g. a time budget ran out)."""
        self._local = True
        self.signal_name = signal_name

    def _handle(self, signum, frame):
        if self._local and signum == signal.SIGINT:
            self.uninstall()
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def install(self) -> PreemptionWatcher:
        """Install the handlers (no-op outside the main thread)."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self.installed = True
        return self

    def uninstall(self) -> None:
        """Put back the handlers that were there before ``install()``."""
        if not self.installed:
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        self.installed = False

    def __enter__(self) -> PreemptionWatcher:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()


def install_preemption_handlers(*, sync_every: int = 1) -> PreemptionWatcher:
    """A ``PreemptionWatcher`` with SIGTERM/SIGINT handlers installed."""
    return PreemptionWatcher(sync_every=sync_every).install()


def _leaf_key(path) -> str:
    return jax.tree_util.keystr(path)


def _host_array(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def save_params(path: str, state: PyTree) -> None:
    """Write a pytree of arrays (e.g. ``nnx.state(model, nnx.Param)``) to one ``.npz``
    file, atomically (a temporary file renamed over ``path``; process 0 writes).

    Leaves are stored by their pytree path with their dtype name, so bfloat16 and
    other ml_dtypes survive.
    """
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    if not leaves:
        raise ValueError("state has no array leaves to save")
    arrays, dtypes = {}, {}
    for i, (key_path, leaf) in enumerate(leaves):
        value = _host_array(leaf)
        if value.dtype.kind == "O":
            raise ValueError(
                f"state leaf {_leaf_key(key_path)} is not an array (got {type(leaf).__name__})"
            )
        dtypes[_leaf_key(key_path)] = value.dtype.name
        if value.dtype.name not in np.sctypeDict:
            # npz cannot describe ml_dtypes (bfloat16, float8): store the raw bytes
            value = value.view(f"u{value.dtype.itemsize}")
        arrays[f"a{i}"] = value
    index = [_leaf_key(p) for p, _ in leaves]
    meta = json.dumps({"keys": index, "dtypes": dtypes})
    if jax.process_index() != 0:
        return
    atomic_save_npz(path, __meta__=np.array(meta), **arrays)


def load_params(path: str, target: PyTree) -> PyTree:
    """The arrays of ``save_params(path, ...)`` in the structure of ``target``.

    Args:
      path: the ``.npz`` file.
      target: a pytree like the saved one, with array or ``jax.ShapeDtypeStruct``
        leaves; a leaf's sharding (if any) places the loaded array.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: a leaf of ``target`` is missing from the file, or its shape or dtype
        differs.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no parameter file at {path!r}")
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["__meta__"]))
        stored = {k: f[f"a{i}"] for i, k in enumerate(meta["keys"])}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_like(target))
    out = []
    for key_path, spec in leaves:
        key = _leaf_key(key_path)
        if key not in stored:
            raise ValueError(f"{path!r} has no parameter {key}; it holds {sorted(stored)[:20]}")
        value = stored[key]
        dtype = np.dtype(jax.numpy.dtype(meta["dtypes"][key]))
        if value.dtype != dtype:
            value = value.view(dtype)
        if value.shape != tuple(spec.shape) or value.dtype != np.dtype(spec.dtype):
            raise ValueError(
                f"parameter {key} in {path!r} is {value.dtype}{list(value.shape)}, but the "
                f"target wants {np.dtype(spec.dtype)}{list(spec.shape)}"
            )
        sharding = getattr(spec, "sharding", None)
        out.append(
            jax.device_put(value, sharding) if sharding is not None else jax.numpy.asarray(value)
        )
    return jax.tree_util.tree_unflatten(treedef, out)


__all__ = [
    "CheckpointManager",
    "PreemptionWatcher",
    "abstract_like",
    "install_preemption_handlers",
    "load_params",
    "save_params",
]
