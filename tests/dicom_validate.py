"""Validate DICOM files the tests write with ``dciodvfy`` (Debian package ``dicom3tools``).

:func:`dciodvfy` runs the validator and returns its "Error" and "Warning" lines; :func:`assert_valid`
fails a test on any error (warnings are allowed and returned) and skips it with a one-line reason when
the validator is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DCIODVFY = "dciodvfy"
SKIP_REASON = "dciodvfy not found: install the Debian package dicom3tools (make system-deps)"


def dciodvfy(path: str | Path) -> tuple[list[str], list[str]]:
    """``(errors, warnings)``: the lines dciodvfy prints for ``path`` starting with Error / Warning."""
    binary = shutil.which(DCIODVFY)
    if binary is None:
        pytest.skip(SKIP_REASON)
    done = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=120)
    lines = (done.stdout + done.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


def assert_valid(path: str | Path) -> list[str]:
    """Fail unless dciodvfy reports 0 errors for ``path``; the warnings it reports are returned."""
    errors, warnings = dciodvfy(path)
    assert errors == [], f"dciodvfy found {len(errors)} error(s) in {path}:\n" + "\n".join(errors)
    return warnings
