"""Progress bars only where a person watches them: the one place that decides.

A tqdm bar redraws itself with carriage returns; written to a log file, a CI log or a pipe it leaves
thousands of frames. So a bar is drawn only when it was asked for (not ``--quiet``) and its stream
(stderr by default) is a terminal. Elsewhere there is no bar: the work's own log lines (one per
training epoch, one per segmented case) say how far it got.
"""

from __future__ import annotations

import sys
from typing import Iterable, Optional, TextIO


def bars_enabled(requested: bool, stream: Optional[TextIO] = None) -> bool:
    """True when a bar was ``requested`` and ``stream`` (default ``sys.stderr``) is a terminal."""
    if not requested:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Optional[Iterable] = None, *, enabled: bool, stream: Optional[TextIO] = None,
                 **tqdm_options):
    """A tqdm bar over ``iterable`` (or with ``total=``) when :func:`bars_enabled`, else ``iterable``
    itself (``None`` when there is none): callers check ``bar is not None`` before ``update``."""
    if not bars_enabled(enabled, stream):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr if stream is None else stream, **tqdm_options)
