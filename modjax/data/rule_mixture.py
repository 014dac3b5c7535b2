"""Synthetic rule-mixture tasks generated in process.

After Mittal, Lajoie, Bengio 2022, "Is a Modular Architecture Enough?" (NeurIPS): data
come from ``N`` rules; a task id says which rule governs each output, and a modular
model should learn one module per rule and route by the id. Three flavours:

- ``"regression"``: inputs x ~ N(0, 1) float32 [B, T, D_in]; targets
  ``W2[n] @ tanh(W1[n] @ x)`` float32 [B, T, D_out] (one random MLP per rule).
- ``"classification"``: the same inputs; targets int32 [B, T] = argmax over D_out
  classes of the rule's MLP output.
- ``"tokens"``: inputs int32 [B, T] in [0, V); targets int32 [B, T] =
  ``perm[n][(x_t + x_{t-1}) mod V]`` (a random permutation per rule of a sum with the
  previous token, x_{-1} = 0), so the rule needs the sequence, not just the token.

The rules come from ``rule_seed`` alone (the same on every host, in train and test);
batch ``k`` comes from ``(seed, split, shard_index, k)``, so the stream is endless,
differs between splits and hosts, and resumes from a single counter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modjax.data.base import (
    SPLITS,
    ArraySpec,
    check_positive_int,
    check_split,
    resolve_shard,
    restore_position,
    stream_identity,
)

KINDS: tuple[str, ...] = ("regression", "classification", "tokens")
GRANULARITIES: tuple[str, ...] = ("sequence", "token")


class RuleMixtureDataset:
    """Batches of ``{"inputs", "targets", "task_id"}`` from ``num_tasks`` random rules.

    Args:
      split: ``"train"`` (endless) or ``"test"`` (``eval_batches`` fixed batches).
      batch_size, seed: as for every dataset.
      kind: ``"regression"``, ``"classification"`` or ``"tokens"`` (see module doc).
      num_tasks: N, the number of rules.
      seq_len: T.
      input_dim, output_dim: D_in and D_out (classes for ``"classification"``) of the
        MLP rules; hidden_dim: their hidden width.
      vocab_size: V for ``"tokens"``.
      granularity: ``"sequence"`` (task_id int32 [B], one rule per sequence) or
        ``"token"`` (task_id int32 [B, T], a rule per position).
      rule_seed: draws the rules; keep it fixed to keep the task.
      eval_batches: number of batches of the test split.
      shard_index, shard_count: this host's stream (default: JAX process).

    Attributes:
      num_tasks, num_classes (classification, tokens), vocab_size (tokens),
      element_spec.
    """

    name = "rule_mixture"

    def __init__(
        self,
        *,
        split: str,
        batch_size: int,
        seed: int,
        kind: str = "tokens",
        num_tasks: int = 4,
        seq_len: int = 16,
        input_dim: int = 8,
        output_dim: int = 4,
        hidden_dim: int = 32,
        vocab_size: int = 16,
        granularity: str = "sequence",
        rule_seed: int = 0,
        eval_batches: int = 8,
        shard_index: int | None = None,
        shard_count: int | None = None,
    ):
        self.split = check_split(split, SPLITS)
        self.batch_size = check_positive_int("batch_size", batch_size)
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {list(GRANULARITIES)}, got {granularity!r}"
            )
        self.seed, self.kind, self.granularity = int(seed), kind, granularity
        self.num_tasks = check_positive_int("num_tasks", num_tasks)
        self.seq_len = check_positive_int("seq_len", seq_len)
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.output_dim = check_positive_int("output_dim", output_dim)
        self.hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        self.eval_batches = check_positive_int("eval_batches", eval_batches)
        self.rule_seed = int(rule_seed)
        self.shard_index, self.shard_count = resolve_shard(shard_index, shard_count)
        rng = np.random.default_rng([self.rule_seed, 7])
        b, t, n = self.batch_size, self.seq_len, self.num_tasks
        task_shape = (b,) if granularity == "sequence" else (b, t)
        if kind == "tokens":
            self.vocab_size = check_positive_int("vocab_size", vocab_size)
            if self.vocab_size < 2:
                raise ValueError(f"vocab_size must be at least 2, got {vocab_size!r}")
            self.num_classes = self.vocab_size
            self.permutations = np.stack([rng.permutation(self.vocab_size) for _ in range(n)])
            inputs = ArraySpec((b, t), np.dtype(np.int32))
            targets = ArraySpec((b, t), np.dtype(np.int32))
        else:
            d_in, d_h, d_out = self.input_dim, self.hidden_dim, self.output_dim
            self.w1 = (rng.standard_normal((n, d_h, d_in)) / np.sqrt(d_in)).astype(np.float32)
            self.w2 = (rng.standard_normal((n, d_out, d_h)) / np.sqrt(d_h)).astype(np.float32)
            inputs = ArraySpec((b, t, d_in), np.dtype(np.float32))
            if kind == "classification":
                if d_out < 2:
                    raise ValueError(f"output_dim must be at least 2 classes, got {output_dim!r}")
                self.num_classes = d_out
                targets = ArraySpec((b, t), np.dtype(np.int32))
            else:
                targets = ArraySpec((b, t, d_out), np.dtype(np.float32))
        self.element_spec = {
            "inputs": inputs,
            "targets": targets,
            "task_id": ArraySpec(task_shape, np.dtype(np.int32)),
        }
        self._batches = 0

    def rule_outputs(self, inputs: np.ndarray, task_id: np.ndarray) -> np.ndarray:
        """The targets of ``inputs`` under the rules ``task_id`` (shapes as in a batch)."""
        task = task_id if task_id.ndim == 2 else np.broadcast_to(task_id[:, None], inputs.shape[:2])
        if self.kind == "tokens":
            previous = np.concatenate([np.zeros_like(inputs[:, :1]), inputs[:, :-1]], axis=1)
            return self.permutations[task, (inputs + previous) % self.vocab_size].astype(np.int32)
        hidden = np.tanh(np.einsum("btj,btij->bti", inputs, self.w1[task]))
        out = np.einsum("bti,btoi->bto", hidden, self.w2[task]).astype(np.float32)
        return np.argmax(out, -1).astype(np.int32) if self.kind == "classification" else out

    def _batch(self, k: int) -> dict[str, np.ndarray]:
        split_id = SPLITS.index(self.split)
        rng = np.random.default_rng([self.seed, split_id, self.shard_index, k])
        task_id = rng.integers(0, self.num_tasks, self.element_spec["task_id"].shape)
        shape = self.element_spec["inputs"].shape
        if self.kind == "tokens":
            inputs = rng.integers(0, self.vocab_size, shape).astype(np.int32)
        else:
            inputs = rng.standard_normal(shape).astype(np.float32)
        task_id = task_id.astype(np.int32)
        return {"inputs": inputs, "targets": self.rule_outputs(inputs, task_id), "task_id": task_id}

    def __iter__(self) -> RuleMixtureDataset:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.split != "train" and self._batches >= self.eval_batches:
            raise StopIteration
        batch = self._batch(self._batches)
        self._batches += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """The position of the iterator, as plain JSON data."""
        return {**stream_identity(self), "batches": self._batches}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (from ``get_state()``; see ``restore_position``)."""
        self._batches = restore_position(self, state)


__all__ = ["GRANULARITIES", "KINDS", "RuleMixtureDataset"]
