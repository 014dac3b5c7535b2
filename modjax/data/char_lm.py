"""Character-level language modelling over text files (by default Debian's fortunes).

The corpus is a file or a directory of files; each file is a *category* (for the
fortunes corpus: ``computers``, ``science``, ...). Files are split into documents at
lines holding only the separator (``%`` in fortune files); documents go to the train or
test split by a fixed draw that never depends on the run's seed, so the splits are the
same in every run and on every host. Examples are windows of ``T + 1`` tokens inside one
category; each training epoch shifts the window grid by a seeded offset, so epochs see
different cuts of the text.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from modjax.data.base import ArraySpec, Dataset, check_positive_int

FORTUNES_DIR = "/usr/share/games/fortunes"
VOCABULARIES: tuple[str, ...] = ("bytes", "chars")
_SPLIT_SEED = 20220101  # the train/test assignment is fixed, not a run choice


def missing_fortunes_message(path: str) -> str:
    return (
        f"text corpus not found: {path!r}. The default corpus is Debian's fortunes "
        f"package ({FORTUNES_DIR}); install it with `sudo apt-get install fortunes` (or "
        "`make data`), or pass path=<a text file or directory> to the char_lm dataset"
    )


def read_corpus(path: str, categories: list[str] | None = None) -> dict[str, str]:
    """Category name -> text, from a text file or a directory of text files.

    In a directory, regular files (not symlinks, not fortune ``.dat`` indexes) whose
    text decodes as UTF-8 are categories, in sorted order.

    Args:
      path: a text file or a directory.
      categories: keep only these file names (all when None).

    Raises:
      FileNotFoundError: naming the path and how to install the default corpus.
      ValueError: an unknown category (listing the available ones) or an empty corpus.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(missing_fortunes_message(path))
    if os.path.isdir(path):
        names = sorted(
            n
            for n in os.listdir(path)
            if not n.endswith(".dat")
            and not n.startswith(".")
            and os.path.isfile(os.path.join(path, n))
            and not os.path.islink(os.path.join(path, n))
        )
        files = {n: os.path.join(path, n) for n in names}
    else:
        files = {os.path.basename(path): path}
    if categories is not None:
        if isinstance(categories, str) or not all(isinstance(c, str) for c in categories):
            raise ValueError(f"categories must be a list of file names, got {categories!r}")
        unknown = sorted(set(categories) - set(files))
        if unknown:
            raise ValueError(
                f"categories {unknown} not found in {path!r}; available: {sorted(files)}"
            )
        files = {n: files[n] for n in sorted(set(categories))}
    texts = {}
    for name, file in files.items():
        with open(file, "rb") as f:
            data = f.read()
        try:
            texts[name] = data.decode("utf-8")
        except UnicodeDecodeError:
            if categories is not None:  # asked for by name: say so rather than drop it
                raise ValueError(f"category {name!r} ({file!r}) is not UTF-8 text") from None
            continue  # a binary file in the directory is not a text category
    if not any(texts.values()):
        raise ValueError(f"no text found in {path!r} (categories {categories!r})")
    return texts


def split_documents(text: str, separator: str) -> list[str]:
    """The documents of ``text``, each ending with its separator line (file format kept)."""
    if not separator:
        return [text]
    docs, current = [], []
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == separator:
            docs.append("".join(current) + line)
            current = []
        else:
            current.append(line)
    if current:
        docs.append("".join(current))
    return [d for d in docs if d.strip(separator + "\r\n\t ")]


def train_test_text(text: str, separator: str, test_fraction: float) -> dict[str, str]:
    """Split one category's text into ``{"train": ..., "test": ...}``.

    Documents are drawn for the test split with a fixed seed; a text with too few
    documents for that (fewer than ``2 / test_fraction``) is cut by characters instead:
    the last ``test_fraction`` of it is the test split.
    """
    docs = split_documents(text, separator)
    if len(docs) * test_fraction >= 2:
        is_test = np.random.default_rng(_SPLIT_SEED).random(len(docs)) < test_fraction
        return {
            "train": "".join(d for d, t in zip(docs, is_test) if not t),
            "test": "".join(d for d, t in zip(docs, is_test) if t),
        }
    cut = int(round(len(text) * (1.0 - test_fraction)))
    return {"train": text[:cut], "test": text[cut:]}


class CharLMDataset(Dataset):
    """Windows of ``T + 1`` characters (or UTF-8 bytes) from a text corpus.

    Batches: ``"tokens"`` int32 [B, T+1], ``"inputs"`` int32 [B, T] (tokens[:, :-1]),
    ``"targets"`` int32 [B, T] (tokens[:, 1:]) and ``"task_id"`` int32 [B], the category
    (file) each window comes from.

    Args:
      split: ``"train"`` (shuffled, endless) or ``"test"`` (in order, one pass).
      batch_size: windows per batch on this shard.
      seed: order of training windows and the per-epoch shift of the window grid.
      seq_len: T, the model's context length.
      path: a text file or a directory of them (default: the fortunes corpus).
      categories: file names to use (default all).
      vocabulary: ``"bytes"`` (256 UTF-8 byte values) or ``"chars"`` (the sorted
        characters of the whole corpus, both splits).
      separator: the document separator line (``"%"`` for fortune files; ``""``: none).
      test_fraction: share of documents (or characters) held out for ``"test"``.
      shard_index, shard_count: this host's share of the windows (default: JAX process).

    Attributes:
      vocab_size, vocab (the characters, for ``"chars"``), categories, num_tasks
      (number of categories), num_tokens (tokens of this split), element_spec.

    Example::

      data = make_dataset("char_lm", split="train", batch_size=8, seed=0, seq_len=64)
      batch = next(data)  # batch["inputs"].shape == (8, 64)
    """

    name = "char_lm"

    def __init__(
        self,
        *,
        split: str,
        batch_size: int,
        seed: int,
        seq_len: int = 128,
        path: str = FORTUNES_DIR,
        categories: list[str] | None = None,
        vocabulary: str = "bytes",
        separator: str = "%",
        test_fraction: float = 0.05,
        shard_index: int | None = None,
        shard_count: int | None = None,
    ):
        super().__init__(
            split=split,
            batch_size=batch_size,
            seed=seed,
            shard_index=shard_index,
            shard_count=shard_count,
        )
        self.seq_len = check_positive_int("seq_len", seq_len)
        if vocabulary not in VOCABULARIES:
            raise ValueError(f"vocabulary must be one of {list(VOCABULARIES)}, got {vocabulary!r}")
        if not isinstance(test_fraction, float | int) or not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        if not isinstance(separator, str):
            raise ValueError(f"separator must be a string, got {separator!r}")
        self.path, self.vocabulary = path, vocabulary
        texts = read_corpus(path, categories)
        self.categories = list(texts)
        self.num_tasks = len(self.categories)
        if vocabulary == "bytes":
            self.vocab = None
            self.vocab_size = 256
        else:
            self.vocab = sorted(set("".join(texts.values())))
            self.vocab_size = len(self.vocab)
            self._char_ids = {c: i for i, c in enumerate(self.vocab)}
        streams, starts, tasks = [], [], []
        offset, window = 0, self.seq_len + 1
        for task, name in enumerate(self.categories):
            text = train_test_text(texts[name], separator, float(test_fraction))[split]
            ids = self.encode(text)
            # each category gives windows that fit whatever the epoch's shift (< window)
            count = max((len(ids) - self.seq_len) // window, 0)
            streams.append(ids)
            starts.append(offset + window * np.arange(count, dtype=np.int64))
            tasks.append(np.full(count, task, np.int32))
            offset += len(ids)
        self._tokens = np.concatenate(streams).astype(np.int32)
        self._starts, self._tasks = np.concatenate(starts), np.concatenate(tasks)
        self.num_tokens = len(self._tokens)
        if not len(self._starts):
            raise ValueError(
                f"char_lm split {split!r} of {path!r} has no category with at least "
                f"2 * seq_len + 1 = {2 * self.seq_len + 1} tokens; use a smaller seq_len"
            )
        self._setup_indices(len(self._starts))
        b, t = self.batch_size, self.seq_len
        self.element_spec = {
            "tokens": ArraySpec((b, t + 1), np.dtype(np.int32)),
            "inputs": ArraySpec((b, t), np.dtype(np.int32)),
            "targets": ArraySpec((b, t), np.dtype(np.int32)),
            "task_id": ArraySpec((b,), np.dtype(np.int32)),
        }

    def encode(self, text: str) -> np.ndarray:
        """Token ids int32 [len] of ``text`` (unknown characters raise ValueError)."""
        if self.vocabulary == "bytes":
            return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
        try:
            return np.array([self._char_ids[c] for c in text], np.int32)
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Any) -> str:
        """The text of token ids (bytes that do not form UTF-8 become U+FFFD)."""
        ids = np.asarray(ids).reshape(-1)
        if self.vocabulary == "bytes":
            return bytes(ids.astype(np.uint8).tolist()).decode("utf-8", errors="replace")
        return "".join(self.vocab[i] for i in ids.tolist())

    def _gather(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        shift = 0
        if self.shuffle:
            shift = int(np.random.default_rng([self.seed, epoch, 1]).integers(self.seq_len + 1))
        starts = self._starts[indices] + shift
        tokens = self._tokens[starts[:, None] + np.arange(self.seq_len + 1)]
        return {
            "tokens": tokens,
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "task_id": self._tasks[indices],
        }


__all__ = ["FORTUNES_DIR", "CharLMDataset", "read_corpus", "split_documents", "train_test_text"]
