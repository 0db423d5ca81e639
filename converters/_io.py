"""Atomic file output: a temporary file in the same folder, then `os.replace`."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


def check_output_path(path, overwrite: bool) -> str:
    """Returns `path` as a string; raises `FileExistsError` if it must not be replaced.

    Args:
        path: The output file.
        overwrite: Whether an existing file may be replaced.

    Returns:
        `os.fspath(path)`.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"Output path {path!r} is a directory; give a file.")
    if not overwrite and os.path.exists(path):
        raise FileExistsError(
            f"Output file {path!r} already exists. Pass overwrite=True "
            "(--force on the command line) to replace it."
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"Output folder {parent!r} does not exist.")
    return path


@contextlib.contextmanager
def atomic_path(path, overwrite: bool = False, suffix: str = "") -> Iterator[str]:
    """Yields a temporary path next to `path`; moves it onto `path` on success.

    On an exception the temporary file is removed and `path` is untouched, so
    an error never leaves a partial output.

    Args:
        path: Final output file.
        overwrite: Whether an existing `path` may be replaced.
        suffix: Suffix of the temporary file (some writers need `.keras`).

    Example:

    >>> import os, tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> with atomic_path(out) as tmp:
    ...     _ = open(tmp, "w").write("hi")
    >>> open(out).read()
    'hi'
    """
    path = check_output_path(path, overwrite)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp" + suffix, dir=folder
    )
    os.close(fd)
    os.remove(tmp)  # writers such as `model.save` want to create the file
    try:
        yield tmp
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"Output file {path!r} appeared while writing.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path, data: bytes, overwrite: bool = False) -> str:
    """Writes `data` to `path` atomically (see `atomic_path`); returns the path."""
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return os.fspath(path)
