"""Errors a user can act on.

Every error raised for bad input says what was expected, what was found, and how to fix it. The CLI
prints ``str(error)`` on one line and exits non-zero; a traceback only appears with ``--debug``.
"""

from __future__ import annotations


class MedsegError(Exception):
    """Base class for errors caused by the user's input, config or environment."""

    exit_code = 2


class ConfigError(MedsegError):
    """A config file or override is invalid (unknown key, bad value, wrong type)."""


class InputError(MedsegError):
    """An input path, scan or label is missing, unreadable or inconsistent."""


class CheckpointError(MedsegError):
    """A model checkpoint is missing, corrupt, or not one of ours."""


class OutputWriteError(MedsegError, OSError):
    """An output could not be written for a reason the user must fix: the disk is full, a quota is
    exceeded, the file system is read-only, permission is denied. Still an :class:`OSError` (with the
    original ``errno``), so code that handles those keeps working; ``str()`` is the one-line message."""

    def __init__(self, errno_: int, message: str):
        super().__init__(errno_, message)

    def __str__(self) -> str:
        return str(self.strerror)


def find_medseg_error(exc: BaseException) -> MedsegError | None:
    """The first :class:`MedsegError` in an exception chain (libraries wrap what they call)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, MedsegError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def describe_error(exc: BaseException) -> str:
    """One line for the user: our own message if one is in the chain, else the exception's first line.

    MONAI wraps errors raised inside transforms in ``RuntimeError("applying transform ...")``; the
    wrapped cause is what the user needs, so it is described instead.
    """
    known = find_medseg_error(exc)
    if known is not None:
        return " ".join(str(known).split())
    while (isinstance(exc, RuntimeError) and str(exc).startswith("applying transform")
           and exc.__cause__ is not None):
        exc = exc.__cause__
    return f"{type(exc).__name__}: {first_line(exc)}"


def first_line(exc: BaseException, default: str = "") -> str:
    """The first line of ``str(exc)``, stripped (``default`` if the message is empty)."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else default


def last_line(exc: BaseException, default: str = "unknown error") -> str:
    """The last line of ``str(exc)``, stripped: what ITK's many-line exceptions say went wrong."""
    lines = str(exc).strip().splitlines()
    return lines[-1].strip() if lines else default
