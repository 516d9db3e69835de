"""Writing files whole, with the permissions people expect, and OS errors in words.

Every file the toolkit writes (bundles, checkpoints, run folders, datasets, caches) goes
through `atomic_path` or the helpers built on it: the data lands in a temporary file beside
the target, is flushed to disk, gets the usual permissions (``0666`` less the umask, so
``0644`` under the common umask) and is renamed onto the target. A reader sees the old file
or the new one, never half of one, and a failed write leaves the old file in place.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

# errno -> what a person should read; anything else falls back to the C library's words.
_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "the name is longer than the file system allows",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the file system is read-only",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EIO: "input/output error (a failing disk or a dropped network share)",
    errno.EFBIG: "the file is larger than this system allows",
    errno.EMFILE: "too many open files",
}

_HINTS = {
    errno.ENOSPC: "free some space or choose another output folder",
    errno.EDQUOT: "free some space or choose another output folder",
    errno.EACCES: "choose a folder you can write to",
    errno.EROFS: "choose a folder you can write to",
}


def os_error_reason(exc: OSError) -> str:
    """The cause of an `OSError` in words, e.g. ``"permission denied"``, without the path."""
    if exc.errno in _REASONS:
        return _REASONS[exc.errno]
    if exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


class WriteError(OSError):
    """A file that could not be written; ``str()`` names the file, the cause and the fix."""

    def __init__(self, path, exc: OSError):
        super().__init__(exc.errno, exc.strerror, os.fspath(path))
        self.path = Path(path)
        self.reason = os_error_reason(exc)

    def __str__(self) -> str:
        hint = _HINTS.get(self.errno)
        return f"{self.path}: cannot be written: {self.reason}" + (f"; {hint}" if hint else "")


def current_umask() -> int:
    """The process umask (read without changing it where ``/proc`` allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_shareable(path, folder: bool = False) -> None:
    """Give a file ``0666`` (a folder ``0777``) less the umask: what ``open``/``mkdir`` would.

    `tempfile.mkstemp` and `tempfile.mkdtemp` create private entries (0600/0700); anything
    renamed into place from them would otherwise stay unreadable to other users.
    """
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


@contextlib.contextmanager
def atomic_path(path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that opens files by name.

    On a normal exit the file is flushed to disk, made shareable and renamed onto ``path``;
    on any error it is removed and ``path`` keeps its old content. An `OSError` while writing
    or renaming is raised as `WriteError`, naming ``path`` and the cause.

    Args:
        path: the final file; its folder must exist.
        suffix: of the temporary name (some writers pick the format from it, e.g. ``.png``).
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise WriteError(path, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _sync(tmp)
        make_shareable(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        # Only errors on the file being written are write errors; a source that cannot be
        # read (say) is reported as itself.
        if isinstance(exc, WriteError) or exc.filename not in (None, str(tmp), str(path)):
            raise
        raise WriteError(path, exc) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", encoding: str = "utf-8") -> Iterator[Any]:
    """`open` for writing, through `atomic_path`: ``with atomic_open(p) as f: f.write(...)``."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode 'w' or 'wb', not {mode!r}")
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as stream:
            yield stream


def write_bytes_atomic(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` whole (see `atomic_path`); returns the path."""
    with atomic_open(path, "wb") as stream:
        stream.write(data)
    return Path(path)


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` whole (see `atomic_path`); returns the path."""
    with atomic_open(path, "w") as stream:
        stream.write(text)
    return Path(path)


def write_json_atomic(path, data: Any, indent: int = 2) -> Path:
    """Write ``data`` as JSON (strict: no NaN) with a final newline, whole; returns the path."""
    return write_text_atomic(path, json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


def copy_atomic(source, target) -> Path:
    """Copy ``source``'s bytes to ``target`` whole, creating ``target``'s folder; returns it."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(target.parent, exc) from None
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def check_writable_folder(folder) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it, before work starts.

    Raises:
        WriteError: the folder cannot be created or written (permission, read-only, full).
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
    except OSError as exc:
        raise WriteError(folder, exc) from None
    os.close(fd)
    os.unlink(probe)
    return folder


def _sync(path: Path) -> None:
    # Renaming a file whose data is still in the page cache can leave an empty file after a
    # power cut: flush the data first.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
