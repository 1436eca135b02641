"""DICOM validation with ``dciodvfy`` (David Clunie's dicom3tools; Debian package ``dicom3tools``).

:func:`validate_dicom` runs it on one file and returns its "Error" and "Warning" lines; ``medseg
validate FILE...`` prints them (exit 0 when no file has an error, 1 otherwise).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from pipeline.errors import InputError

DCIODVFY = "dciodvfy"
MISSING = ("dciodvfy not found on PATH: install the Debian package dicom3tools "
           "(apt-get install dicom3tools; `make system-deps`)")


@dataclass
class Validation:
    path: str
    iod: str = ""  # the IOD dciodvfy checked against, e.g. Segmentation, RTStructureSet
    errors: list = field(default_factory=list)
    warnings: list = field(default_factory=list)


def dciodvfy_available() -> bool:
    return shutil.which(DCIODVFY) is not None


def validate_dicom(path: Union[str, Path], timeout: float = 300.0) -> Validation:
    """dciodvfy's findings for ``path`` (:class:`InputError` when dciodvfy or the file is missing)."""
    binary = shutil.which(DCIODVFY)
    if binary is None:
        raise InputError(MISSING)
    if not Path(path).is_file():
        raise InputError(f"'{path}' is not a file: pass DICOM files to validate")
    done = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=timeout)
    lines = (done.stdout + done.stderr).splitlines()
    result = Validation(str(path))
    result.errors = [line for line in lines if line.startswith("Error")]
    result.warnings = [line for line in lines if line.startswith("Warning")]
    result.iod = next((line.strip() for line in lines if line.strip() and not line.startswith(("Error", "Warning"))),
                      "")
    return result
