"""Validate DICOM files the tests write with ``dciodvfy`` (Debian package ``dicom3tools``).

:func:`dciodvfy` runs the validator and returns its "Error" and "Warning" lines; :func:`assert_valid`
fails a test on any error (warnings are allowed and returned) and skips it with a one-line reason when
the validator is not installed. With ``MEDSEG_DCIODVFY_LOG=FILE`` every finding is appended to FILE.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.io.validate import dciodvfy_available, validate_dicom

SKIP_REASON = "dciodvfy not found: install the Debian package dicom3tools (make system-deps)"


def dciodvfy(path: str | Path) -> tuple[list[str], list[str]]:
    """``(errors, warnings)``: the lines dciodvfy prints for ``path`` starting with Error / Warning."""
    if not dciodvfy_available():
        pytest.skip(SKIP_REASON)
    result = validate_dicom(path)
    return result.errors, result.warnings


def assert_valid(path: str | Path) -> list[str]:
    """Fail unless dciodvfy reports 0 errors for ``path``; the warnings it reports are returned."""
    errors, warnings = dciodvfy(path)
    record = os.environ.get("MEDSEG_DCIODVFY_LOG")  # a file to append "path<TAB>line" per finding to
    if record:
        with open(record, "a") as handle:
            handle.write(f"{path}\tvalidated: {len(errors)} error(s), {len(warnings)} warning(s)\n")
            handle.writelines(f"{path}\t{line}\n" for line in errors + warnings)
    assert errors == [], f"dciodvfy found {len(errors)} error(s) in {path}:\n" + "\n".join(errors)
    return warnings
