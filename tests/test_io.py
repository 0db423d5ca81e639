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


def test_dangling_symlink_output(tmp_path):
    link = tmp_path / "out.onnx"
    link.symlink_to(tmp_path / "gone" / "target.onnx")
    with pytest.raises(
        FileExistsError,
        match=r"is a symbolic link to .*target\.onnx', which does not exist\. "
        r"Remove the link, or pass overwrite=True",
    ):
        atomic_write_bytes(link, b"x")
    assert link.is_symlink()
    atomic_write_bytes(link, b"x", overwrite=True)  # the link itself is replaced
    assert not link.is_symlink() and link.read_bytes() == b"x"
    assert not (tmp_path / "gone").exists() and os.listdir(tmp_path) == ["out.onnx"]


def test_symlink_to_a_file_is_replaced_not_written_through(tmp_path):
    target = tmp_path / "v1.onnx"
    target.write_bytes(b"v1")
    link = tmp_path / "latest.onnx"
    link.symlink_to(target)
    with pytest.raises(FileExistsError, match="already exists"):
        atomic_write_bytes(link, b"v2")
    atomic_write_bytes(link, b"v2", overwrite=True)
    assert not link.is_symlink() and link.read_bytes() == b"v2"
    assert target.read_bytes() == b"v1"
    assert sorted(os.listdir(tmp_path)) == ["latest.onnx", "v1.onnx"]


@pytest.fixture
def sigint_during(monkeypatch):
    """Sends SIGINT to this process right after the first call of os.NAME."""
    import signal

    def arm(name):
        real = getattr(os, name)
        sent = []

        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            if not sent:
                sent.append(True)
                os.kill(os.getpid(), signal.SIGINT)
            return result

        monkeypatch.setattr(os, name, call)

    return arm


@pytest.mark.parametrize("existing", [None, b"old"])
def test_interrupt_during_the_rename_is_undone(tmp_path, sigint_during, existing):
    from converters import _io

    path = tmp_path / "out.onnx"
    if existing is not None:
        path.write_bytes(existing)
    sigint_during("replace" if existing is not None else "link")
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write_bytes(path, b"new", overwrite=existing is not None)
        assert _io.interrupted.is_set()
    finally:
        _io.interrupted.clear()
    if existing is None:
        assert os.listdir(tmp_path) == []
    else:
        assert path.read_bytes() == existing and os.listdir(tmp_path) == ["out.onnx"]


def test_nothing_published_once_interrupted(tmp_path):
    from converters import _io

    _io.interrupted.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write_bytes(tmp_path / "out.onnx", b"x")
    finally:
        _io.interrupted.clear()
    assert os.listdir(tmp_path) == []
