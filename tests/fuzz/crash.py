"""A reader for :data:`pipeline.io.isolated.READ_FUNCTION` that dies of SIGABRT on one scan, as a
native reader (GDCM, ITK) would on a file that crashes it: any source whose path holds
:data:`CRASH_MARKER` aborts the reader process; every other source is read as usual."""

from __future__ import annotations

import os

from pipeline.io.read_scan import read_scan

CRASH_MARKER = "crash_me"


def _paths(source) -> list[str]:
    sources = getattr(source, "sources", None)
    if sources is not None:  # Channels
        return [p for s in sources for p in _paths(s)]
    files = getattr(source, "files", None)
    if files is not None:  # DicomVolume
        return [str(f) for f in files]
    return [str(p) for p in source] if isinstance(source, (list, tuple)) else [str(source)]


def abort_on_marker(source):
    if any(CRASH_MARKER in path for path in _paths(source)):
        os.abort()
    return read_scan(source)


def exit_on_marker(source):
    """Like :func:`abort_on_marker`, but the reader process exits (status 3, its cleanup runs)."""
    if any(CRASH_MARKER in path for path in _paths(source)):
        raise SystemExit(3)
    return read_scan(source)
