"""The model cache: exported, quantised and converted networks and backend decisions, with a size cap.

Layout of :func:`cache_dir` (one folder per kind, :data:`KINDS`):

* ``onnx/``: fp32 ONNX exports of checkpoints (:func:`pipeline.infer.backend.onnx_path`);
* ``int8/``: their static QDQ int8 quantisations (:mod:`pipeline.infer.quantize`);
* ``openvino/``: OpenVINO IR (``.xml`` + ``.bin``) converted from either (:mod:`pipeline.infer.openvino`);
* ``backend/``: ``inference.backend: auto`` decisions (small JSON files).

**Size cap.** After each new file is written (:func:`prune_cache`), the least recently used files beyond
``$MEDSEG_CACHE_MAX_GB`` (default :data:`DEFAULT_MAX_GB`; ``0`` or below: no cap) are deleted, oldest
first, never the file just written. "Used" is the file's modification time, which :func:`touch` sets
whenever a cached file is loaded (access times are unreliable: ``noatime``/``relatime`` mounts). An
OpenVINO ``.xml`` and its ``.bin`` are one entry (deleted together).

``medseg cache list`` / ``medseg cache clear [--what onnx|int8|openvino|backend|all]`` are a thin layer over
:func:`list_cache` and :func:`clear_cache`. This module imports no torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from pipeline.config.schema import CACHE_KINDS
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_ENV = "MEDSEG_CACHE_DIR"
MAX_GB_ENV = "MEDSEG_CACHE_MAX_GB"
DEFAULT_MAX_GB = 2.0
KINDS = CACHE_KINDS
CLEAR_CHOICES = (*KINDS, "all")

__all__ = ["CACHE_ENV", "CLEAR_CHOICES", "KINDS", "MAX_GB_ENV", "CacheEntry", "cache_dir", "clear_cache",
           "list_cache", "max_cache_bytes", "prune_cache", "touch"]


def cache_dir() -> Path:
    """Folder for exported models and calibration results, created on demand.

    ``$MEDSEG_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/medseg``, else ``~/.cache/medseg``.
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "medseg"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"Cache folder: expected a writable folder at {root}, found an error: {exc}. "
            f"Set {CACHE_ENV} to a writable folder."
        ) from exc
    return root


@dataclass
class CacheEntry:
    """One cached model or decision: its files (an OpenVINO IR has two), total size, last use."""

    kind: str
    files: list[Path]
    size: int
    used: float  # modification time of the newest file (seconds since the epoch)

    @property
    def name(self) -> str:
        return self.files[0].name


def _entry_key(path: Path) -> Path:
    return path.with_suffix("") if path.suffix in (".xml", ".bin") else path


def _entries(kinds: Iterable[str]) -> list[CacheEntry]:
    root = cache_dir()
    out = []
    for kind in kinds:
        folder = root / kind
        if not folder.is_dir():
            continue
        groups: dict[Path, list[Path]] = {}
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith("."):  # dot files: atomic writes in flight
                groups.setdefault(_entry_key(path), []).append(path)
        for files in groups.values():
            stats = []
            for f in files:
                try:
                    stats.append(f.stat())
                except OSError:  # deleted meanwhile by another process
                    continue
            if stats:
                out.append(CacheEntry(kind, files, sum(s.st_size for s in stats), max(s.st_mtime for s in stats)))
    return out


def list_cache() -> dict:
    """``{"path", "total_bytes", "max_bytes", "kinds": {kind: {"files", "bytes", "entries": [...]}}}``."""
    entries = _entries(KINDS)
    kinds = {}
    for kind in KINDS:
        mine = [e for e in entries if e.kind == kind]
        kinds[kind] = {"files": sum(len(e.files) for e in mine), "bytes": sum(e.size for e in mine),
                       "entries": [{"name": e.name, "files": [f.name for f in e.files], "bytes": e.size,
                                    "used": e.used} for e in sorted(mine, key=lambda e: -e.used)]}
    return {"path": str(cache_dir()), "total_bytes": sum(e.size for e in entries), "max_bytes": max_cache_bytes(),
            "kinds": kinds}


def _check_what(what: str) -> None:
    if what not in CLEAR_CHOICES:
        raise ConfigError(f"cache clear --what: expected one of {', '.join(CLEAR_CHOICES)}, found {what!r}. "
                          "Pass one kind of cached file, or 'all'.")


def clear_cache(what: str = "all") -> dict:
    """Delete the cached files of one kind (``onnx``, ``int8``, ``openvino``, ``backend``) or ``all``;
    ``{"files": deleted files, "bytes": their size}``."""
    _check_what(what)
    kinds = KINDS if what == "all" else (what,)
    files = size = 0
    for entry in _entries(kinds):
        files += _delete(entry)
        size += entry.size
    log.debug("Cache: deleted %d file(s), %.1f MB (%s) from %s.", files, size / 1e6, what, cache_dir())
    return {"files": files, "bytes": size}


def _delete(entry: CacheEntry) -> int:
    deleted = 0
    for path in entry.files:
        try:
            path.unlink()
            deleted += 1
        except FileNotFoundError:
            pass
    return deleted


def max_cache_bytes() -> Optional[int]:
    """The cap from ``$MEDSEG_CACHE_MAX_GB`` (default :data:`DEFAULT_MAX_GB`), None for no cap (<= 0)."""
    text = os.environ.get(MAX_GB_ENV, "").strip()
    try:
        gb = float(text) if text else DEFAULT_MAX_GB
    except ValueError:
        raise ConfigError(f"{MAX_GB_ENV}: expected a number of gigabytes such as 2 (0: no cap), found "
                          f"{text!r}. Set it to a number or unset it.") from None
    return int(gb * 1e9) if gb > 0 else None


def touch(path: Path) -> None:
    """Mark a cached file as used now (its modification time), for the least-recently-used pruning."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache still serves
        pass


def prune_cache(keep: Iterable[Path] = (), max_bytes: Optional[int] = -1) -> list[Path]:
    """Delete least recently used entries until the cache fits ``max_bytes`` (default: the
    :func:`max_cache_bytes` cap; None: no cap), never those holding a path of ``keep`` (the file just
    written). The deleted files, oldest first."""
    if max_bytes == -1:
        max_bytes = max_cache_bytes()
    if max_bytes is None:
        return []
    kept = {Path(p).resolve() for p in keep}
    entries = _entries(KINDS)
    total = sum(e.size for e in entries)
    deleted: list[Path] = []
    for entry in sorted(entries, key=lambda e: e.used):
        if total <= max_bytes:
            break
        if any(f.resolve() in kept for f in entry.files):
            continue
        _delete(entry)
        total -= entry.size
        deleted.extend(entry.files)
    if deleted:
        log.info("Cache over %.2f GB: deleted %d least recently used file(s) (%s).", max_bytes / 1e9,
                 len(deleted), ", ".join(p.name for p in deleted[:4]) + (" ..." if len(deleted) > 4 else ""))
    return deleted
