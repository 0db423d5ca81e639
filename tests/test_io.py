"""Tests for converters._io: atomic writes that never leave partial files."""

import os
import time

import pytest

from converters._io import (
    ABANDONED_AFTER_S,
    STALE_AFTER_S,
    atomic_path,
    atomic_write_bytes,
    check_writable,
)


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


def _temp_name(pid, suffix=".onnx"):
    return f".out.onnx.{pid}.abcd_123.tmp{suffix}"


def _dead_pid():
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_removed_on_next_write(tmp_path):
    old = time.time() - STALE_AFTER_S - 60
    ancient = time.time() - ABANDONED_AFTER_S - 60
    files = {
        _temp_name(_dead_pid()): (old, False),  # writer gone, stale: removed
        _temp_name(_dead_pid(), ".keras"): (time.time(), True),  # too recent
        _temp_name(os.getpid()): (old, True),  # writer alive
        _temp_name(os.getpid(), ""): (ancient, False),  # abandoned a day ago
        ".out.onnx.abcd_123.tmp.onnx": (old, False),  # older name, no pid
        ".out.onnx.keep": (ancient, True),  # not our pattern
        "other.tmp": (ancient, True),
    }
    for name, (mtime, _) in files.items():
        (tmp_path / name).write_bytes(b"partial")
        os.utime(tmp_path / name, (mtime, mtime))
    atomic_write_bytes(tmp_path / "new.bin", b"x")
    kept = {name for name, (_, keep) in files.items() if keep}
    assert set(os.listdir(tmp_path)) == kept | {"new.bin"}


def test_lost_race_keeps_the_other_file(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(FileExistsError, match="appeared while writing"):
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"mine")
            path.write_bytes(b"theirs")  # another writer wins meanwhile
    assert path.read_bytes() == b"theirs" and os.listdir(tmp_path) == ["out.bin"]


def test_check_writable(tmp_path):
    check_writable(tmp_path / "x.onnx")
    assert os.listdir(tmp_path) == []
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc (not writable even by root)")
    with pytest.raises(PermissionError, match="not writable"):
        check_writable("/proc/x.onnx")
