"""Atomic writes: the target is either the old file or the complete new one."""

import os

import numpy as np
import pytest

from modjax.files import atomic_save_npz, atomic_write_bytes


def test_write_replaces_and_creates_folders(tmp_path):
    path = tmp_path / "a" / "b" / "f.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["f.bin"]  # no temporary left behind


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "params.npz"
    atomic_save_npz(path, w=np.arange(3))

    with pytest.raises(TypeError):
        atomic_write_bytes(path, object())  # not bytes: fails inside the write
    with np.load(path) as data:
        np.testing.assert_array_equal(data["w"], np.arange(3))
    assert os.listdir(tmp_path) == ["params.npz"]
