"""Atomic file writes: write to a temporary name in the target folder, then rename into place.

A reader (or a re-run after ``kill -9``) never sees half a file: the target either does not exist
or is complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union


@contextlib.contextmanager
def atomic_path(target: Union[str, Path], suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success rename it to ``target``, else delete it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(data, target: Union[str, Path], indent: int = 2) -> Path:
    """Strict JSON (NaN and infinities become ``null``; numpy scalars, paths and the like plain values),
    written atomically."""
    target = Path(target)
    with atomic_path(target, suffix=".tmp.json") as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n")
    return target


def json_safe(value):
    """``value`` with what strict JSON cannot hold replaced: non-finite floats → None, numpy scalars →
    Python numbers, other objects → ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return json_safe(value.item())
    return str(value)
