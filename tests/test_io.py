"""Tests for converters._io: atomic writes that never leave partial files."""

import os

import pytest

from converters._io import atomic_path, atomic_write_bytes


def test_write_and_refuse_overwrite(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write_bytes(path, b"one")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"one"
    atomic_write_bytes(path, b"two", overwrite=True)
    assert path.read_bytes() == b"two" and os.listdir(tmp_path) == ["out.bin"]


def test_error_leaves_nothing(tmp_path):
    path = tmp_path / "out.keras"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path, suffix=".keras") as tmp:
            assert tmp.endswith(".keras") and os.path.dirname(tmp) == str(tmp_path)
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_bad_output_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_bytes(tmp_path / "no" / "x.bin", b"")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write_bytes(tmp_path, b"")
