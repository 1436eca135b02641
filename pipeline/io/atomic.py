"""Atomic, durable file writes: write to a temporary name in the target folder, then rename into place.

A reader (or a re-run after ``kill -9``) never sees half a file: the target either does not exist
or is complete. The file is flushed to disk (``fsync``) before the rename and the folder after it,
so a power cut cannot leave an empty or partial file under the final name either.

The file gets the mode any ordinary ``open()`` would give it (``0o666`` less the process umask), not
the ``0o600`` of :func:`tempfile.mkstemp`: masks, manifests and checkpoints in a shared folder stay
readable by the group when the umask says so.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterator, Union

from pipeline.errors import OutputWriteError

_UMASK_LOCK = threading.Lock()

# Write failures the user has to fix (and that any other file in that folder would meet too).
_USER_FIXABLE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for the file system",
}


def current_umask() -> int:
    """The process umask, read without changing it where the OS says it (Linux: ``/proc/self/status``).

    Elsewhere it is set and restored at once under a lock (``os.umask`` can only be read by setting
    it); files other threads create in that instant without this lock could get mode ``0o077``-masked.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """Mode of a new regular file under the current umask (``0o644`` for umask ``022``)."""
    return 0o666 & ~current_umask()


def make_partial_dir(target: Union[str, Path], tag: str = "partial") -> Path:
    """A new empty folder beside ``target`` (``.<name>.<tag>-XXXXXXXX``) to build it in and rename into
    place, with the mode a plain ``mkdir`` gives under the umask (``0o755`` for ``022``), not
    :func:`tempfile.mkdtemp`'s ``0o700``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-", dir=target.parent))
    os.chmod(folder, 0o777 & ~current_umask())
    return folder


def fsync_file(path: Union[str, Path]) -> None:
    """Flush a file's data and metadata to disk (whoever wrote it, through whichever descriptor)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Union[str, Path]) -> None:
    """Flush a folder's entries (a rename in it) to disk; a no-op where folders cannot be opened
    (Windows) or synced (some network file systems: ``EINVAL``)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Union[str, Path], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success make it durable, give it the umask's mode
    and rename it to ``target``, else delete it.

    The temporary file exists (empty, owner-only) while the block writes it by name (``nib.save``,
    ``torch.save``, ``savefig``...): the final mode is set only once it is complete, so a umask that
    leaves the owner without write permission cannot stop the writer.

    A full disk, an exceeded quota, a read-only file system or a denied permission, met at any step
    (including inside the block), becomes an :class:`~pipeline.errors.OutputWriteError` naming the
    problem and ``target``: ``no space left on device while writing '...'``; the temporary is gone.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
        os.close(fd)
    except OSError as exc:
        if _user_fixable(exc):
            raise write_error(exc, target) from exc
        raise
    try:
        yield Path(tmp)
        fsync_file(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _user_fixable(exc):
            raise write_error(exc, target) from exc
        raise
    fsync_dir(target.parent)


def _user_fixable(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and not isinstance(exc, OutputWriteError) and exc.errno in _USER_FIXABLE


def write_error(exc: OSError, target: Union[str, Path]) -> OutputWriteError:
    """``exc`` (its ``errno`` one of the user-fixable ones) met while writing ``target``, as one line
    the user can act on."""
    problem = _USER_FIXABLE.get(exc.errno) or (exc.strerror or "cannot write").lower()
    fix = ("free space on that disk (or choose another output folder) and run again"
           if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
           else "choose a folder you can write to, or fix its permissions, and run again")
    return OutputWriteError(exc.errno, f"{problem} while writing '{target}': {fix}")


def write_json(data, target: Union[str, Path], indent: int = 2) -> Path:
    """Strict JSON (NaN and infinities become ``null``; numpy scalars, paths and the like plain values),
    written atomically."""
    target = Path(target)
    with atomic_path(target, suffix=".tmp.json") as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n")
    return target


def json_safe(value):
    """``value`` with what strict JSON cannot hold replaced: non-finite floats → None, numpy scalars →
    Python numbers, other objects → ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    return str(value)
