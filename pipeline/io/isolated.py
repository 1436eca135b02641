"""Reading untrusted scans in a separate process, so that a native crash costs one case, not the batch.

A corrupt file can make a C++ reader (GDCM, ITK's NIfTI/NRRD readers) crash the process: a segfault
or an abort is not a Python exception and no ``try`` catches it. :class:`IsolatedReader` keeps one
reader process (a fresh interpreter, ``python -c``: not ``multiprocessing``'s ``spawn``, which would
re-run the caller's main script; it imports :mod:`pipeline.io.read_scan`, not torch or MONAI, so it
starts in well under a second), sends it one source at a time over a pipe and gets back a
:class:`~pipeline.io.read_scan.Loaded`:

* the voxels come back through a ``.npy`` file in a private temporary folder (``/dev/shm`` where it
  exists, so memory): the reader writes it (one copy), the caller maps it and unlinks it at once (no
  copy; the pages live as long as the array);
* an error of the read (:class:`~pipeline.errors.InputError` or any other exception) is raised in the
  caller as it was raised in the reader; the reader's log records are re-emitted in the caller (so they
  reach ``segment.log`` through the same redaction);
* if the reader dies (a signal, ``os._exit``), :meth:`IsolatedReader.read` raises
  :class:`ReaderCrashed` ("the reader crashed (signal SIGSEGV) on <source>") and the next read starts a
  new reader.

What the reader process calls is ``read_function``, by default :data:`READ_FUNCTION`
(:func:`~pipeline.io.read_scan.read_scan`). It must be importable by name (a module-level function):
tests replace :data:`READ_FUNCTION` (``monkeypatch``) by one that aborts on a given file, to check that
a crash costs one case (``tests/fuzz/crash.py``). Nothing else reads it.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pipeline.errors import InputError
from pipeline.io.channels import Channels
from pipeline.io.dicom_series import DicomVolume
from pipeline.io.read_scan import source_name

log = logging.getLogger(__name__)

_POLL_S = 0.2


class ReaderCrashed(InputError):
    """The reader process died while reading a scan (a native crash, killed by a signal)."""


def read_in_reader(source):
    """:func:`~pipeline.io.read_scan.read_scan`, imported in the reader process only."""
    from pipeline.io.read_scan import read_scan

    return read_scan(source)


READ_FUNCTION: Callable = read_in_reader  # what a new IsolatedReader's process calls (tests replace it)


class IsolatedReader:
    """One reader process, restarted when it dies; ``read(source)`` returns a ``Loaded``.

    Use as a context manager (or call :meth:`close`): the process and the temporary folder go with it.
    :meth:`start` starts the process ahead of the first read (it imports while the caller works).
    """

    def __init__(self, read_function: Optional[Callable] = None):
        self.read_function = read_function or READ_FUNCTION
        self._process = None
        self._conn = None
        self._folder: Optional[Path] = None
        self._count = 0
        self._lock = threading.Lock()

    def __enter__(self) -> IsolatedReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        if self._folder is None or not self._folder.is_dir():  # a reader that ended removed it
            shm = Path("/dev/shm")
            base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
            self._folder = Path(tempfile.mkdtemp(prefix="medseg-read-", dir=base))
        from_parent, to_child = os.pipe()  # (read end, write end)
        from_child, to_parent = os.pipe()
        function = f"{self.read_function.__module__}:{self.read_function.__qualname__}"
        command = [sys.executable, "-c", "from pipeline.io.isolated import serve; serve()",
                   str(from_parent), str(to_parent), function, str(self._folder)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        try:
            self._process = subprocess.Popen(command, pass_fds=(from_parent, to_parent), env=env,
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(from_parent), os.close(to_parent)
        self._conn = _Duplex(Connection(from_child, writable=False), Connection(to_child, readable=False))

    def read(self, source):
        """``source`` read in the reader process: a ``Loaded``, or the read's own exception."""
        with self._lock:
            self.start()
            self._count += 1
            out = self._folder / f"scan-{self._count}.npy"
            try:
                try:
                    self._conn.send((source, str(out)))
                except OSError:
                    pass  # the reader is gone: _receive says how
                reply = self._receive()
            except ReaderCrashed as crash:
                out.unlink(missing_ok=True)
                raise ReaderCrashed(f"{crash} on {source_name(source)}") from None
            return _unpack(reply, source, out)

    def close(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                try:
                    self._conn.send(None)
                    self._process.wait(timeout=2)
                except (OSError, subprocess.TimeoutExpired):
                    self._process.kill()
                    self._process.wait()
            self._conn.close()
            self._process = self._conn = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _receive(self):
        while True:
            if self._conn.poll(_POLL_S):
                try:
                    return self._conn.recv()
                except (EOFError, OSError):
                    break  # the reader closed its end: it is ending
            elif self._process.poll() is not None:
                break
        try:
            code = self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # it closed the pipe but lives on
            self._process.kill()
            code = self._process.wait()
        finally:
            self._conn.close()
            self._process = self._conn = None
        raise ReaderCrashed(_how_it_died(code))


class _Duplex:
    """Two one-way pipes as one connection."""

    def __init__(self, incoming: Connection, outgoing: Connection):
        self.incoming, self.outgoing = incoming, outgoing

    def send(self, message) -> None:
        self.outgoing.send(message)

    def poll(self, timeout: float) -> bool:
        return self.incoming.poll(timeout)

    def recv(self):
        return self.incoming.recv()

    def close(self) -> None:
        self.incoming.close()
        self.outgoing.close()


def _how_it_died(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the reader crashed (signal {name})"
    return f"the reader process exited unexpectedly (status {code})"


def _volumes(source) -> list:
    """The DICOM volumes a read fills in (their ``assumptions``), in a stable order."""
    if isinstance(source, DicomVolume):
        return [source]
    if isinstance(source, Channels):
        return [s for s in source.sources if isinstance(s, DicomVolume)]
    return []


def _unpack(reply, source, out: Path):
    from pipeline.io.read_scan import Loaded

    kind, payload, records = reply
    for record in records:
        logging.getLogger(record.name).handle(record)
    if kind == "error":
        out.unlink(missing_ok=True)
        raise payload
    affine, where, source_format, assumptions = payload
    try:
        array = np.load(out, mmap_mode="r+")  # a view of the reader's file: no copy
    except ValueError:  # an empty array cannot be mapped
        array = np.load(out)
    out.unlink()  # the mapping keeps the pages
    for volume, found in zip(_volumes(source), assumptions):
        volume.assumptions = list(found)
    return Loaded(array, affine, where, source_format)


# --- the reader process ------------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        record.msg, record.args = record.getMessage(), None  # formatted here: the args may not pickle
        record.exc_info = record.exc_text = record.stack_info = None
        self.records.append(record)


def serve() -> None:
    """The reader process's main (``argv``: its two pipe ends, ``module:function`` to read with, and the
    temporary folder, which it removes when it ends: also when the caller was killed, which closes the
    pipe, so no scan is left in ``/dev/shm``)."""
    incoming, outgoing, function, folder = sys.argv[1:5]
    try:
        module, _, name = function.partition(":")
        read_function = importlib.import_module(module)
        for part in name.split("."):
            read_function = getattr(read_function, part)
        _serve(_Duplex(Connection(int(incoming), writable=False), Connection(int(outgoing), readable=False)),
               read_function)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _serve(conn, read_function: Callable) -> None:
    """Read what is asked, one source at a time, until ``None`` or the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    collect = _Collect()
    package = logging.getLogger("pipeline")
    package.addHandler(collect)
    package.setLevel(logging.DEBUG)
    package.propagate = False  # nothing on this process's stderr
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        source, out = message
        collect.records = []
        try:
            loaded = read_function(source)
            np.save(out, loaded.array, allow_pickle=False)
            assumptions = [list(v.assumptions) for v in _volumes(source)]
            reply = ("ok", (loaded.affine, loaded.source, loaded.source_format, assumptions))
        except Exception as exc:
            reply = ("error", _portable(exc))
        try:
            conn.send((*reply, collect.records))
        except (EOFError, OSError):
            return


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives pickling as itself, else an ``InputError`` with its one-line description."""
    import pickle

    from pipeline.errors import describe_error

    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == str(exc):
            return exc
    except Exception:
        pass
    return InputError(describe_error(exc))
