"""Data pipelines: determinism, exact resume, epochs, sharding, splits and errors."""

import gzip
import json
import os
import struct

import numpy as np
import pytest

from modjax.data import DATASETS, make_dataset
from modjax.data.char_lm import FORTUNES_DIR, split_documents
from modjax.data.fashion_mnist import FASHION_MNIST_DIR


def _take(data, n):
    return [next(data) for _ in range(n)]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture
def corpus(tmp_path):
    """Two fortune-style category files (documents separated by '%' lines)."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "\u00e9t\u00e9", "zeta"]
    for name in ("cats", "dogs"):
        docs = [" ".join(rng.choice(words, 12)) + "\n" for _ in range(60)]
        (tmp_path / name).write_text("%\n".join(docs) + "%\n", encoding="utf-8")
    (tmp_path / "cats.dat").write_bytes(b"\x00\x01binary index")
    return str(tmp_path)


def _write_idx(path, array, gz):
    dtype_code = {np.uint8: 0x08}[array.dtype.type]
    header = struct.pack(">BBBB", 0, 0, dtype_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.tobytes()
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(data)
    else:
        with open(path, "wb") as f:
            f.write(data)


@pytest.fixture(params=[True, False], ids=["gz", "raw"])
def fashion_dir(tmp_path, request):
    rng = np.random.default_rng(1)
    for prefix, n in (("train", 40), ("t10k", 12)):
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte"), images, request.param)
        _write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte"), labels, request.param)
    return str(tmp_path)


def _builders(corpus, fashion_dir):
    return {
        "char_lm": dict(path=corpus, seq_len=8),
        "fashion_mnist": dict(path=fashion_dir),
        "rule_mixture": dict(seq_len=6),
    }


def test_make_dataset_unknown_name_lists_valid():
    with pytest.raises(ValueError, match="char_lm.*fashion_mnist.*rule_mixture"):
        make_dataset("imagenet", split="train", batch_size=2, seed=0)
    assert sorted(DATASETS) == ["char_lm", "fashion_mnist", "rule_mixture"]


@pytest.mark.parametrize("name", ["char_lm", "fashion_mnist", "rule_mixture"])
def test_same_seed_same_order_and_exact_resume(name, corpus, fashion_dir):
    kw = _builders(corpus, fashion_dir)[name]
    a = make_dataset(name, split="train", batch_size=4, seed=3, **kw)
    b = make_dataset(name, split="train", batch_size=4, seed=3, **kw)
    _same(_take(a, 5), _take(b, 5))
    # resume through JSON (as in a checkpoint) on a fresh iterator
    state = json.loads(json.dumps(a.get_state()))
    expected = _take(a, 25)  # crosses epoch boundaries for the small datasets
    c = make_dataset(name, split="train", batch_size=4, seed=3, **kw)
    c.set_state(state)
    _same(_take(c, 25), expected)
    other = make_dataset(name, split="train", batch_size=4, seed=4, **kw)
    first_key = sorted(expected[0])[0]
    assert not all(
        np.array_equal(x[first_key], y[first_key]) for x, y in zip(_take(other, 25), expected)
    )
    for batch in expected:
        for key, spec in a.element_spec.items():
            assert batch[key].shape == spec.shape and batch[key].dtype == spec.dtype


@pytest.mark.parametrize("name", ["char_lm", "fashion_mnist", "rule_mixture"])
def test_eval_split_is_finite_and_fixed(name, corpus, fashion_dir):
    kw = _builders(corpus, fashion_dir)[name]
    first = list(make_dataset(name, split="test", batch_size=4, seed=0, **kw))
    again = list(make_dataset(name, split="test", batch_size=4, seed=9, **kw))
    assert 0 < len(first) < 1000
    if name != "rule_mixture":  # eval order of real data does not depend on the seed
        _same(first, again)
    with pytest.raises(ValueError, match="split"):
        make_dataset(name, split="valid", batch_size=4, seed=0, **kw)


@pytest.mark.parametrize("name", ["char_lm", "fashion_mnist", "rule_mixture"])
def test_set_state_rejects_other_dataset(name, corpus, fashion_dir):
    kw = _builders(corpus, fashion_dir)[name]
    a = make_dataset(name, split="train", batch_size=4, seed=0, **kw)
    b = make_dataset(name, split="train", batch_size=2, seed=0, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        b.set_state(a.get_state())
    bad = dict(a.get_state())
    bad["batches"] = -1
    with pytest.raises(ValueError, match="non-negative"):
        a.set_state(bad)


def test_fashion_mnist_epochs_shards_and_values(fashion_dir):
    data = make_dataset("fashion_mnist", split="train", batch_size=4, seed=0, path=fashion_dir)
    assert data.num_classes == 10 and data.batches_per_epoch == 10
    epoch0 = _take(data, 10)
    labels0 = np.concatenate([b["label"] for b in epoch0])
    assert sorted(labels0.tolist()) == sorted((np.arange(40) % 10).tolist())  # each once
    epoch1 = _take(data, 10)
    assert not np.array_equal(labels0, np.concatenate([b["label"] for b in epoch1]))
    assert (data.get_state()["epoch"], data.get_state()["batch"]) == (2, 0)
    b = epoch0[0]
    assert b["image"].shape == (4, 28, 28, 1) and b["image"].dtype == np.float32
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    # the test split goes through the examples in file order
    test = list(make_dataset("fashion_mnist", split="test", batch_size=3, seed=0, path=fashion_dir))
    assert len(test) == 4
    np.testing.assert_array_equal(test[0]["label"], [0, 1, 2])
    # disjoint shards that cover the examples
    seen = []
    for shard in range(2):
        d = make_dataset(
            "fashion_mnist", split="test", batch_size=2, seed=0, path=fashion_dir,
            shard_index=shard, shard_count=2,
        )  # fmt: skip
        seen.append(np.concatenate([x["label"] for x in d]))
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.sort(np.arange(12) % 10))
    with pytest.raises(ValueError, match="shard_index"):
        make_dataset("fashion_mnist", split="test", batch_size=2, seed=0, path=fashion_dir,
                     shard_index=2, shard_count=2)  # fmt: skip


def test_fashion_mnist_pixels_match_file(tmp_path):
    images = np.arange(6 * 28 * 28, dtype=np.int64).reshape(6, 28, 28) % 256
    _write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), images.astype(np.uint8), False)
    _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.arange(6, dtype=np.uint8), False)
    batch = next(
        make_dataset("fashion_mnist", split="test", batch_size=6, seed=0, path=str(tmp_path))
    )
    np.testing.assert_allclose(batch["image"][..., 0], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(batch["label"], np.arange(6))


def test_fashion_mnist_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        make_dataset("fashion_mnist", split="train", batch_size=2, seed=0, path=str(tmp_path))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 8)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01")
    with pytest.raises(ValueError, match="t10k-images"):
        make_dataset("fashion_mnist", split="test", batch_size=2, seed=0, path=str(tmp_path))


def test_char_lm_windows_are_the_text(corpus):
    data = make_dataset("char_lm", split="train", batch_size=4, seed=0, path=corpus, seq_len=8)
    assert data.vocab_size == 256 and data.categories == ["cats", "dogs"] and data.num_tasks == 2
    texts = {
        c: open(os.path.join(corpus, c), encoding="utf-8").read().encode() for c in ("cats", "dogs")
    }
    for batch in _take(data, 30):
        np.testing.assert_array_equal(batch["inputs"], batch["tokens"][:, :-1])
        np.testing.assert_array_equal(batch["targets"], batch["tokens"][:, 1:])
        for row, task in zip(batch["tokens"], batch["task_id"]):
            # each window is a contiguous piece of its own category's text
            assert bytes(row.astype(np.uint8).tolist()) in texts[data.categories[task]]


def test_char_lm_splits_are_disjoint_documents_and_chars_vocab(corpus):
    kw = dict(path=corpus, seq_len=8, vocabulary="chars")
    train = make_dataset("char_lm", split="train", batch_size=2, seed=0, **kw)
    test = make_dataset("char_lm", split="test", batch_size=2, seed=0, **kw)
    assert train.vocab == test.vocab and "\u00e9" in train.vocab
    assert train.vocab_size == len(train.vocab) < 256
    assert 0 < test.num_tokens < train.num_tokens
    docs = split_documents(open(os.path.join(corpus, "cats"), encoding="utf-8").read(), "%")
    assert len(docs) == 60 and all(d.endswith("%\n") for d in docs)
    text = train.decode(next(test)["tokens"][0])
    assert train.decode(train.encode("beta gamma")) == "beta gamma"
    assert isinstance(text, str) and len(text) == 9


def test_char_lm_categories_and_errors(corpus, tmp_path):
    one = make_dataset("char_lm", split="train", batch_size=2, seed=0, path=corpus, seq_len=8,
                       categories=["dogs"])  # fmt: skip
    assert one.categories == ["dogs"] and one.num_tasks == 1
    with pytest.raises(ValueError, match="birds.*available.*cats"):
        make_dataset(
            "char_lm", split="train", batch_size=2, seed=0, path=corpus, categories=["birds"]
        )
    (tmp_path / "blob").write_bytes(b"\xff\xfe\x00 not text")
    all_text = make_dataset("char_lm", split="train", batch_size=2, seed=0, path=corpus, seq_len=8)
    assert all_text.categories == ["cats", "dogs"]  # a binary file is not a category
    with pytest.raises(ValueError, match="category 'blob'.*not UTF-8"):
        make_dataset(
            "char_lm", split="train", batch_size=2, seed=0, path=corpus, categories=["blob"]
        )
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        make_dataset("char_lm", split="train", batch_size=2, seed=0, path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="seq_len"):
        make_dataset("char_lm", split="train", batch_size=2, seed=0, path=corpus, seq_len=0)
    with pytest.raises(ValueError, match="seq_len"):
        make_dataset("char_lm", split="train", batch_size=2, seed=0, path=corpus, seq_len=100000)
    with pytest.raises(ValueError, match="batch_size"):
        make_dataset("char_lm", split="train", batch_size=10**7, seed=0, path=corpus, seq_len=8)
    with pytest.raises(ValueError, match="vocabulary"):
        make_dataset("char_lm", split="train", batch_size=2, seed=0, path=corpus, vocabulary="wp")


def test_char_lm_epochs_shift_windows(corpus):
    data = make_dataset("char_lm", split="train", batch_size=2, seed=0, path=corpus, seq_len=8)
    n = data.batches_per_epoch
    e0 = np.concatenate([b["tokens"] for b in _take(data, n)])
    e1 = np.concatenate([b["tokens"] for b in _take(data, n)])
    assert data.get_state()["epoch"] == 2 and not np.array_equal(e0, e1)


def test_rule_mixture_targets_follow_rules():
    data = make_dataset("rule_mixture", split="train", batch_size=8, seed=0, num_tasks=3,
                        vocab_size=11, seq_len=5)  # fmt: skip
    assert data.num_tasks == 3 and data.vocab_size == 11 and data.num_classes == 11
    batch = next(data)
    x, y, task = batch["inputs"], batch["targets"], batch["task_id"]
    assert x.shape == (8, 5) and task.shape == (8,) and task.max() < 3
    for b in range(8):
        prev = 0
        for t in range(5):
            assert y[b, t] == data.permutations[task[b], (x[b, t] + prev) % 11]
            prev = x[b, t]
    # rules are fixed by rule_seed, shared by train and test; data differ per split
    test = make_dataset("rule_mixture", split="test", batch_size=8, seed=0, num_tasks=3,
                        vocab_size=11, seq_len=5, eval_batches=3)  # fmt: skip
    np.testing.assert_array_equal(test.permutations, data.permutations)
    batches = list(test)
    assert len(batches) == 3 and not np.array_equal(batches[0]["inputs"], x)


@pytest.mark.parametrize("kind", ["regression", "classification"])
def test_rule_mixture_mlp_rules(kind):
    data = make_dataset("rule_mixture", split="train", batch_size=4, seed=1, kind=kind,
                        granularity="token", num_tasks=2, seq_len=3, input_dim=5, output_dim=3,
                        hidden_dim=7)  # fmt: skip
    batch = next(data)
    x, task = batch["inputs"], batch["task_id"]
    assert x.shape == (4, 3, 5) and x.dtype == np.float32 and task.shape == (4, 3)
    for b in range(4):
        for t in range(3):
            n = task[b, t]
            out = data.w2[n] @ np.tanh(data.w1[n] @ x[b, t])
            if kind == "regression":
                np.testing.assert_allclose(batch["targets"][b, t], out, rtol=1e-5, atol=1e-6)
            else:
                assert batch["targets"][b, t] == np.argmax(out)
    with pytest.raises(ValueError, match="kind"):
        make_dataset("rule_mixture", split="train", batch_size=4, seed=1, kind="mlp")


def test_shard_defaults_to_jax_process():
    data = make_dataset("rule_mixture", split="train", batch_size=2, seed=0)
    assert (data.shard_index, data.shard_count) == (0, 1)
    a = make_dataset("rule_mixture", split="train", batch_size=2, seed=0, shard_index=1,
                     shard_count=2)  # fmt: skip
    assert not np.array_equal(next(a)["inputs"], next(data)["inputs"])


@pytest.mark.skipif(not os.path.isdir(FORTUNES_DIR), reason="fortunes not installed "
                    "(apt-get install fortunes)")  # fmt: skip
def test_real_fortunes_corpus():
    data = make_dataset("char_lm", split="train", batch_size=2, seed=0, seq_len=32,
                        categories=["computers", "science"])  # fmt: skip
    assert data.categories == ["computers", "science"] and data.num_tokens > 100_000
    assert next(data)["tokens"].shape == (2, 33)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Fashion-MNIST not installed "
                    "(apt-get install dataset-fashion-mnist)")  # fmt: skip
def test_real_fashion_mnist():
    data = make_dataset("fashion_mnist", split="test", batch_size=100, seed=0)
    assert data.num_examples == 10_000 and len(data) == 100
    batch = next(data)
    assert batch["image"].shape == (100, 28, 28, 1) and set(batch["label"]) <= set(range(10))


@pytest.mark.parametrize("name", ["char_lm", "fashion_mnist", "rule_mixture"])
def test_state_of_process_0_resumes_other_shards_in_lockstep(name, corpus, fashion_dir):
    """Multi-host restart: only process 0's data state is checkpointed."""
    kw = _builders(corpus, fashion_dir)[name]

    def shard(i, seed):
        return make_dataset(name, split="train", batch_size=2, seed=seed, shard_index=i,
                            shard_count=2, **kw)  # fmt: skip

    host0, host1 = shard(0, 0), shard(1, 1000)
    _take(host0, 13)
    _take(host1, 13)
    state0 = host0.get_state()
    expected = _take(host1, 7)
    resumed = shard(1, 1000)
    resumed.set_state(state0)
    _same(_take(resumed, 7), expected)
    with pytest.raises(ValueError, match="seed"):
        shard(0, 5).set_state(state0)  # the same shard with another seed is another order
    with pytest.raises(ValueError, match="shard_count"):
        make_dataset(name, split="train", batch_size=2, seed=0, **kw).set_state(state0)


def test_shards_get_equal_shares(tmp_path):
    """7 examples on 2 hosts: 3 each (one dropped), so eval passes end together."""
    _write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), np.zeros((7, 28, 28), np.uint8), False)
    _write_idx(str(tmp_path / "t10k-labels-idx1-ubyte"), np.arange(7, dtype=np.uint8), False)
    labels = []
    for i in range(2):
        data = make_dataset("fashion_mnist", split="test", batch_size=1, seed=0,
                            path=str(tmp_path), shard_index=i, shard_count=2)  # fmt: skip
        assert len(data) == 3
        labels += [int(b["label"][0]) for b in data]
    assert sorted(labels) == [0, 1, 2, 3, 4, 5]
