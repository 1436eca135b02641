"""Provenance sidecar per mask, ``<case>_seg.json``: where the mask came from and how it was made.

It holds the source (path, series UID, case id), the model checkpoint's sha256, the case fingerprint
(see :mod:`pipeline.batch.report.fingerprint`), the full config, package versions, start/end times (ISO 8601),
host, the mask's shape and spacing, and the lesion statistics. It is written last, atomically: a mask
counts as finished only when its sidecar exists and carries the expected fingerprint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

from pipeline.io.atomic import write_json

SIDECAR_FORMAT = "medseg-sidecar"
SIDECAR_VERSION = 1


def write_sidecar(path: Union[str, Path], data: dict) -> Path:
    path = Path(path)
    payload = {"format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION, **data}
    return write_json(payload, path, indent=1)


def read_sidecar(path: Union[str, Path]) -> Optional[dict]:
    """The sidecar's content, or ``None`` when it is missing, unreadable or not one of ours."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or payload.get("format") != SIDECAR_FORMAT:
        return None
    return payload
