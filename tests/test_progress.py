"""Progress bars only on a terminal (pipeline/progress.py): elsewhere no carriage-return frames."""

from __future__ import annotations

import io

from pipeline.progress import bars_enabled, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_bar_and_no_carriage_return_off_a_terminal():
    stream = io.StringIO()
    items = range(50)
    bar = progress_bar(items, enabled=True, stream=stream, desc="epoch 1/1")
    assert bar is items and list(bar) == list(range(50))
    assert progress_bar(enabled=True, stream=stream, total=5) is None
    assert stream.getvalue() == ""  # nothing at all, so no "\r"


def test_a_bar_on_a_terminal_unless_disabled():
    terminal = _Terminal()
    assert bars_enabled(True, terminal) and not bars_enabled(False, terminal)
    assert list(progress_bar(range(3), enabled=True, stream=terminal, desc="epoch")) == [0, 1, 2]
    assert "\r" in terminal.getvalue() and "epoch" in terminal.getvalue()
    assert progress_bar(range(3), enabled=False, stream=_Terminal()) == range(3)


def test_a_closed_or_odd_stream_gets_no_bar():
    closed = io.StringIO()
    closed.close()
    assert not bars_enabled(True, closed) and not bars_enabled(True, object())
