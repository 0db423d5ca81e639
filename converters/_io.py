"""Atomic file output: a temporary file in the same folder, then a rename.

Temporary files are named `.<name>.<pid>.<random>.tmp<suffix>`, hidden, next
to the output. A writer killed before its rename leaves one behind: the next
write to that folder removes the stale ones (ours only: that pattern, untouched
for `STALE_AFTER_S` seconds and whose writer process is gone, or untouched for
a day).

A symbolic link as the output is replaced itself, never written through: its
target is left as it was. A link whose target is missing counts as an
existing output (replaced only with `overwrite=True`).

Interrupts: once `interrupted` is set (the `keras-bn` command sets it on
Ctrl-C, in case a library swallowed the `KeyboardInterrupt`), `atomic_path`
raises `KeyboardInterrupt` instead of publishing. A Ctrl-C during the rename
itself is held until the rename is done, which is then undone (the previous
file, if any, is put back) before `KeyboardInterrupt` is raised: an
interrupted write leaves the output as it was.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator

STALE_AFTER_S = 300.0
ABANDONED_AFTER_S = 86400.0
_TEMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp(\.\w+)?$")
# Set on Ctrl-C by the command line; `atomic_path` then publishes nothing.
interrupted = threading.Event()


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
    if not overwrite and os.path.islink(path) and not os.path.exists(path):
        raise FileExistsError(
            f"Output {path!r} is a symbolic link to {os.readlink(path)!r}, which "
            "does not exist. Remove the link, or pass overwrite=True (--force on "
            "the command line) to replace the link itself (its target is never "
            "written)."
        )
    if not overwrite and os.path.exists(path):
        raise FileExistsError(
            f"Output file {path!r} already exists. Pass overwrite=True "
            "(--force on the command line) to replace it."
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"Output folder {parent!r} does not exist.")
    return path


def check_writable(path) -> None:
    """Raises `PermissionError` (or another `OSError`) if `path`'s folder is not
    writable, by creating and removing a temporary file there (`os.access`
    says yes to root on a read-only mount)."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        fd, probe = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=folder)
    except OSError as e:
        raise PermissionError(
            f"Output folder {folder!r} is not writable ({e.strerror or e})."
        ) from e
    os.close(fd)
    os.remove(probe)


def _prefix(path) -> str:
    return f".{os.path.basename(os.fspath(path))}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def remove_stale_temporaries(folder, now: float | None = None) -> list[str]:
    """Removes our stale temporary files from `folder`; returns their names.

    Only names of our pattern count, and only if untouched for
    `STALE_AFTER_S` seconds with their writer process gone (or no process id
    in the name), or untouched for `ABANDONED_AFTER_S` (a process id may have
    been reused, or belong to another machine sharing the folder).
    """
    now = time.time() if now is None else now
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMP.match(name)
        if match is None:
            continue
        full = os.path.join(folder, name)
        try:
            stat = os.lstat(full)
        except OSError:
            continue
        if not os.path.isfile(full) or os.path.islink(full):
            continue
        age = now - stat.st_mtime
        pid = match.group("pid")
        gone = pid is None or not _alive(int(pid))
        if (age > STALE_AFTER_S and gone) or age > ABANDONED_AFTER_S:
            with contextlib.suppress(OSError):
                os.remove(full)
                removed.append(name)
    return removed


def _publish(tmp: str, path: str, overwrite: bool) -> Callable[[], None]:
    """Moves `tmp` onto `path`; returns a function that undoes it.

    Without `overwrite`, atomically refuses to replace a file that appeared
    meanwhile (a hard link fails if `path` exists; where links are
    unsupported, a check then a rename). With it, the file replaced is kept
    as a hard link next to it until the caller is done (where hard links
    work), so that the undo can put it back.
    """
    if overwrite:
        backup = None
        if os.path.lexists(path):
            backup = _backup_name(tmp)
            try:
                os.link(path, backup, follow_symlinks=False)
            except OSError:
                backup = None
        os.replace(tmp, path)

        def undo():
            if backup is not None:
                os.replace(backup, path)
            else:
                os.remove(path)

        return undo
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(
            f"Output file {path!r} appeared while writing (another process?); "
            "nothing was replaced. Pass overwrite=True (--force) to replace it."
        ) from None
    except OSError:  # No hard links on this file system.
        if os.path.lexists(path):
            raise FileExistsError(
                f"Output file {path!r} appeared while writing; nothing was replaced."
            ) from None
        os.replace(tmp, path)
    else:
        os.remove(tmp)
    return lambda: os.remove(path)


def _backup_name(tmp: str) -> str:
    return tmp[: tmp.rindex(".tmp")] + ".tmp.old"  # our temporary-file pattern


@contextlib.contextmanager
def _sigint_held() -> Iterator[list]:
    """In the main thread, Ctrl-C only appends to the yielded list meanwhile."""
    caught: list = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    try:
        yield caught
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def atomic_path(path, overwrite: bool = False, suffix: str = "") -> Iterator[str]:
    """Yields a temporary path next to `path`; moves it onto `path` on success.

    On an exception the temporary file is removed and `path` is untouched, so
    an error never leaves a partial output. Stale temporary files of earlier,
    killed writers in that folder are removed first. An interrupt (see the
    module docstring) leaves `path` as it was.

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
    remove_stale_temporaries(folder)
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp" + suffix, dir=folder)
    os.close(fd)
    os.remove(tmp)  # writers such as `model.save` want to create the file
    try:
        yield tmp
        if interrupted.is_set():
            raise KeyboardInterrupt
        with _sigint_held() as caught:
            undo = _publish(tmp, path, overwrite)
            if caught or interrupted.is_set():
                undo()
        if caught or interrupted.is_set():
            interrupted.set()
            raise KeyboardInterrupt
    finally:
        for leftover in (tmp, _backup_name(tmp)):
            if os.path.lexists(leftover):
                os.remove(leftover)


def atomic_write_bytes(path, data: bytes, overwrite: bool = False) -> str:
    """Writes `data` to `path` atomically (see `atomic_path`); returns the path."""
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return os.fspath(path)
