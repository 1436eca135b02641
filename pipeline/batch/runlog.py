"""``segment.log``: the package's log and one line per case, appended for the length of a run.

``run_log`` is the logger of the per-case lines (on the console too when no progress bar is drawn).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from pipeline.errors import describe_error
from pipeline.io.privacy import Redactor

log = logging.getLogger(__name__)
run_log = logging.getLogger("pipeline.run")  # per-case lines for segment.log (the console: off a terminal)

__all__ = ["log_to", "run_log"]


class _RunLogHandler(logging.FileHandler):
    """``segment.log``: a line that cannot be written (a full disk) is dropped, with one warning on the
    console, instead of logging's traceback for every line; the run itself goes on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self._failed:
            return
        self._failed = True
        error = sys.exc_info()[1]
        log.warning("cannot write to the run's log '%s' (%s): its lines are dropped from here on",
                    self.baseFilename, describe_error(error) if error is not None else "unknown error")


@contextlib.contextmanager
def log_to(path: Path, redact: Redactor, echo: bool = False):
    """Append the package's log (and the per-case lines of ``run_log``) to ``path`` during the run, every
    line through ``redact``. ``echo``: the per-case lines go to the console too (when no bar is drawn)."""
    handler = _RunLogHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    if not redact.keep_paths:
        handler.addFilter(redact.log_filter())
    package = logging.getLogger("pipeline")
    run_log.propagate = echo  # to the package's handlers (this file) and the console
    run_log.setLevel(logging.INFO)
    package.addHandler(handler)
    if not echo:
        run_log.addHandler(handler)
    try:
        yield
    finally:
        package.removeHandler(handler)
        run_log.removeHandler(handler)
        run_log.propagate = False
        handler.close()
