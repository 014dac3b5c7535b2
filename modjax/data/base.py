"""The iterator contract every modjax dataset keeps, and the epoch/shard bookkeeping.

A dataset is an iterator of batches (dicts of numpy arrays, leading axis ``B``) with an
explicit, JSON-serializable position: ``get_state()`` returns it and ``set_state()``
jumps back to it, so a resumed run sees exactly the batches it would have seen. Orders
are pure functions of ``(seed, epoch)``: no hidden random state exists to be lost.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

SPLITS: tuple[str, ...] = ("train", "test")


class ArraySpec(NamedTuple):
    """Shape and dtype of one batch entry (``element_spec`` values)."""

    shape: tuple[int, ...]
    dtype: np.dtype


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as an int, or a ValueError naming ``name`` unless it is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def check_split(split: Any, valid: tuple[str, ...] = SPLITS) -> str:
    """``split`` unchanged, or a ValueError listing the valid splits."""
    if split not in valid:
        raise ValueError(f"split must be one of {list(valid)}, got {split!r}")
    return split


def resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """``(shard_index, shard_count)``; ``None`` means this JAX process of all processes."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    shard_count = check_positive_int("shard_count", shard_count)
    if isinstance(shard_index, bool) or not isinstance(shard_index, int | np.integer):
        raise ValueError(f"shard_index must be an int, got {shard_index!r}")
    if not 0 <= shard_index < shard_count:
        raise ValueError(
            f"shard_index must be in [0, shard_count={shard_count}), got {shard_index}"
        )
    return int(shard_index), shard_count


class Dataset(Iterator[dict[str, np.ndarray]]):
    """Base of modjax datasets: batches from a fixed set of examples, by index.

    Subclasses set ``name``, ``element_spec`` and metadata attributes, call
    ``_setup_indices(num_examples)`` and implement ``_gather(indices, epoch)``.
    Train splits loop forever, reshuffling each epoch with ``(seed, epoch)``; other
    splits go once through the examples in order and stop. Each shard (host) owns the
    examples ``shard_index::shard_count`` (equal shares); incomplete last batches are
    dropped so shapes stay static.

    Attributes:
      split, batch_size, seed, shard_index, shard_count: as constructed.
      element_spec: batch key -> ``ArraySpec`` of the batch arrays.
      batches_per_epoch: full batches in one pass over this shard's examples.
    """

    name: str = "dataset"
    element_spec: dict[str, ArraySpec]

    def __init__(
        self,
        *,
        split: str,
        batch_size: int,
        seed: int,
        shard_index: int | None,
        shard_count: int | None,
        splits: tuple[str, ...] = SPLITS,
    ):
        self.split = check_split(split, splits)
        self.batch_size = check_positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)
        self.shard_index, self.shard_count = resolve_shard(shard_index, shard_count)
        self.shuffle = self.split == "train"
        self._batches = 0  # batches returned so far: the whole position

    def _setup_indices(self, num_examples: int) -> None:
        self.num_examples = int(num_examples)
        # equal shares (the remainder is dropped): every host then has the same number
        # of batches, so hosts stay in lockstep through eval passes and epochs
        end = self.num_examples // self.shard_count * self.shard_count
        self._shard_examples = np.arange(self.shard_index, end, self.shard_count)
        self.batches_per_epoch = len(self._shard_examples) // self.batch_size
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"{self.name} split {self.split!r} has {len(self._shard_examples)} examples "
                f"on shard {self.shard_index}/{self.shard_count}, fewer than batch_size="
                f"{self.batch_size}; use a smaller batch_size or more data"
            )

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self._shard_examples
        rng = np.random.default_rng([self.seed, epoch])
        return self._shard_examples[rng.permutation(len(self._shard_examples))]

    def _gather(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __iter__(self) -> Dataset:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, batch = divmod(self._batches, self.batches_per_epoch)
        if epoch and not self.shuffle:
            raise StopIteration
        if self._cached_epoch != epoch:
            self._cached_order, self._cached_epoch = self._order(epoch), epoch
        indices = self._cached_order[batch * self.batch_size : (batch + 1) * self.batch_size]
        self._batches += 1
        return self._gather(indices, epoch)

    _cached_epoch = -1
    _cached_order: np.ndarray

    def __len__(self) -> int:
        """Batches in one pass (train iterators repeat it forever)."""
        return self.batches_per_epoch

    def get_state(self) -> dict[str, Any]:
        """The position of the iterator, as plain JSON data (``"batches"`` returned so
        far; ``"epoch"`` and ``"batch"`` within it are for reading)."""
        epoch, batch = divmod(self._batches, self.batches_per_epoch)
        return {**stream_identity(self), "batches": self._batches, "epoch": epoch, "batch": batch}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (from ``get_state()``; see ``restore_position``)."""
        self._batches = restore_position(self, state)


def stream_identity(dataset) -> dict[str, Any]:
    """What a data state must match to resume ``dataset``: its name, split, batch size,
    seed and shard (any object with those attributes, e.g. a Dataset)."""
    return {
        "dataset": dataset.name,
        "split": dataset.split,
        "batch_size": dataset.batch_size,
        "seed": dataset.seed,
        "shard_index": dataset.shard_index,
        "shard_count": dataset.shard_count,
    }


def restore_position(dataset, state: Any) -> int:
    """The ``"batches"`` count of ``state``, after checking it fits ``dataset``.

    All hosts draw one batch per step, so a position is the same on every shard: a
    state written by another shard (another ``shard_index``, and then maybe another
    per-host ``seed``) resumes this one at the same step, which is what a multi-host
    restart needs when only process 0's state was saved. The same shard must keep its
    seed, and the dataset, split, batch size and shard count must match.

    Raises:
      ValueError: naming the field of ``state`` that does not fit.
    """
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict from get_state(), got {state!r}")
    identity = stream_identity(dataset)
    keys = ["dataset", "split", "batch_size", "shard_count"]
    if state.get("shard_index") == identity["shard_index"]:
        keys.append("seed")
    for key in keys:
        if state.get(key) != identity[key]:
            raise ValueError(
                f"state[{key!r}]={state.get(key)!r} does not match this dataset's "
                f"{identity[key]!r}; a data state resumes only the dataset that wrote it"
            )
    batches = state.get("batches")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
        raise ValueError(f"state['batches'] must be a non-negative int, got {batches!r}")
    return batches


__all__ = [
    "SPLITS",
    "ArraySpec",
    "Dataset",
    "check_positive_int",
    "check_split",
    "resolve_shard",
    "restore_position",
    "stream_identity",
]
