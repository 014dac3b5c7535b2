"""Input pipelines: deterministic, shardable, checkpointable iterators of numpy batches.

Every dataset is built by ``make_dataset(name, split=..., batch_size=..., seed=...,
**kwargs)`` and is an iterator of dicts of numpy arrays (leading axis B, this host's
batch) with ``get_state()`` (JSON data) and ``set_state(state)``: the same seed gives
the same batches, and a restored state continues the exact same sequence. Train splits
loop forever (reshuffled per epoch); test splits are finite.

Datasets (``DATASETS``):
  char_lm        characters of a text corpus (Debian's fortunes by default)
  fashion_mnist  Fashion-MNIST images from IDX files (Debian's dataset-fashion-mnist)
  rule_mixture   synthetic multi-task rules (Mittal et al. 2022), generated in process

Example::

  from modjax.data import make_dataset
  train = make_dataset("char_lm", split="train", batch_size=16, seed=0, seq_len=64)
  batch = next(train)              # {"tokens", "inputs", "targets", "task_id"}
  state = train.get_state()        # store with the checkpoint; later: set_state(state)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modjax.data.base import ArraySpec, Dataset
from modjax.data.char_lm import CharLMDataset
from modjax.data.fashion_mnist import FashionMNISTDataset
from modjax.data.rule_mixture import RuleMixtureDataset

DATASETS: dict[str, Callable[..., Any]] = {
    "char_lm": CharLMDataset,
    "fashion_mnist": FashionMNISTDataset,
    "rule_mixture": RuleMixtureDataset,
}


def make_dataset(name: str, *, split: str, batch_size: int, seed: int, **kwargs):
    """The dataset ``name`` (a key of ``DATASETS``), built with its keyword arguments.

    Args:
      name: ``"char_lm"``, ``"fashion_mnist"`` or ``"rule_mixture"``.
      split: ``"train"`` or ``"test"``.
      batch_size: examples per batch on this host (B).
      seed: the data order (and generated data) of the run.
      **kwargs: the dataset's own arguments (see its class), including
        ``shard_index``/``shard_count`` (default: this JAX process of all processes).

    Returns:
      An iterator of batches with ``get_state``/``set_state``, ``element_spec`` and
      metadata attributes (``vocab_size``, ``num_classes``, ``num_tasks``).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset name {name!r}; valid: {sorted(DATASETS)}")
    return DATASETS[name](split=split, batch_size=batch_size, seed=seed, **kwargs)


__all__ = [
    "DATASETS",
    "ArraySpec",
    "CharLMDataset",
    "Dataset",
    "FashionMNISTDataset",
    "RuleMixtureDataset",
    "make_dataset",
]
