"""Fashion-MNIST image classification from IDX files (Debian's dataset-fashion-mnist).

Xiao, Rasul, Vollgraf 2017, "Fashion-MNIST: a Novel Image Dataset for Benchmarking
Machine Learning Algorithms". 28x28 grayscale images of 10 clothing classes, 60,000 for
training and 10,000 for testing, stored in the IDX format of LeCun's MNIST (optionally
gzipped).
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from modjax.data.base import ArraySpec, Dataset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {
    0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}  # fmt: skip


def read_idx(path: str) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` files are decompressed).

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the header or the size does not describe a valid IDX array.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path!r} is not an IDX file (header {data[:4]!r})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path!r} is truncated inside its IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], ">u4"))
    expected = header + int(np.prod(shape)) * dtype.itemsize
    if len(data) != expected:
        raise ValueError(
            f"{path!r} holds {len(data)} bytes but its IDX header {shape} needs {expected}"
        )
    return np.frombuffer(data[header:], dtype).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx(directory: str, stem: str) -> str:
    """The path of ``stem`` or ``stem.gz`` in ``directory``, or a FileNotFoundError
    that names it and how to install Fashion-MNIST."""
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {os.path.join(directory, stem)}[.gz] not found. Install "
        "Debian's package with `sudo apt-get install dataset-fashion-mnist` (files in "
        f"{FASHION_MNIST_DIR}), or run `make data`, or pass path=<directory of IDX files>"
    )


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST batches: ``"image"`` float32 [B, 28, 28, 1] in [0, 1] and
    ``"label"`` int32 [B].

    Args:
      split: ``"train"`` (shuffled, endless) or ``"test"`` (in order, one pass).
      batch_size, seed: as for every dataset.
      path: directory holding the four IDX files (plain or ``.gz``).
      num_examples: use only the first this many examples of the split (None: all).
      shard_index, shard_count: this host's share of the examples (default: JAX process).

    Attributes:
      num_classes (10), class_names, num_examples, element_spec.
    """

    name = "fashion_mnist"

    def __init__(
        self,
        *,
        split: str,
        batch_size: int,
        seed: int,
        path: str = FASHION_MNIST_DIR,
        num_examples: int | None = None,
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
        image_stem, label_stem = _FILES[self.split]
        image_path, label_path = find_idx(path, image_stem), find_idx(path, label_stem)
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{image_path!r} {images.shape} and {label_path!r} {labels.shape} are not "
                "[N, H, W] images with [N] labels"
            )
        if num_examples is not None:
            if isinstance(num_examples, bool) or not isinstance(num_examples, int):
                raise ValueError(f"num_examples must be an int or None, got {num_examples!r}")
            if not 1 <= num_examples <= len(labels):
                raise ValueError(f"num_examples must be in [1, {len(labels)}], got {num_examples}")
            images, labels = images[:num_examples], labels[:num_examples]
        if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
            raise ValueError(f"{label_path!r} has labels outside [0, {len(CLASS_NAMES)})")
        self.path = path
        self.num_classes, self.class_names = len(CLASS_NAMES), CLASS_NAMES
        self._images, self._labels = images, labels.astype(np.int32)
        self._setup_indices(len(labels))
        b, (h, w) = self.batch_size, images.shape[1:]
        self.element_spec = {
            "image": ArraySpec((b, h, w, 1), np.dtype(np.float32)),
            "label": ArraySpec((b,), np.dtype(np.int32)),
        }

    def _gather(self, indices: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
        images = self._images[indices].astype(np.float32) / 255.0
        return {"image": images[..., None], "label": self._labels[indices]}


__all__ = ["CLASS_NAMES", "FASHION_MNIST_DIR", "FashionMNISTDataset", "find_idx", "read_idx"]
