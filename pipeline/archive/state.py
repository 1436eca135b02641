"""``dicomweb-state.json`` in the output folder: what a run against an archive has already done.

One entry per SeriesInstanceUID (per StudyInstanceUID for a multi-channel model, whose unit is the study;
its entry also records each case's channel series UIDs): the resume key (the series UID + the model fingerprint: model, settings,
package version and outputs asked for, :func:`series_key`; a study's key is made of the study UID and all
its image series UIDs), the case ids its volumes became, and, per file
pushed (``<case>_seg.dcm``, ``<case>_rtstruct.dcm``), the sha256 of the bytes stored. A re-run with the same
key retrieves nothing for a done series and pushes only what is missing or changed. Written atomically after
every change.
"""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Optional

from pipeline.batch.report.fingerprint import settings_identity
from pipeline.io.atomic import write_json

STATE_NAME = "dicomweb-state.json"
STATE_FORMAT = "medseg-dicomweb-state"


def series_key(series_uid: str, model_id: str, config, outputs: Optional[dict] = None) -> str:
    """What a done series must match to be kept: its UID and everything that decides its outputs."""
    from pipeline import __version__

    payload = {"series_uid": series_uid, "model": model_id, "settings": settings_identity(config),
               "medseg": __version__, "outputs": dict(outputs or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ArchiveState:
    """The state file of one output folder; every method saves at once (under a lock: threads share it)."""

    def __init__(self, path: Path, archive: str):
        self.path = Path(path)
        self._lock = threading.RLock()
        self.data = {"format": STATE_FORMAT, "archive": archive, "series": {}}
        try:
            loaded = json.loads(self.path.read_text())
            if loaded.get("format") == STATE_FORMAT and isinstance(loaded.get("series"), dict):
                self.data["series"] = loaded["series"]
        except (OSError, ValueError):
            pass  # none yet (or unreadable: everything is redone, nothing is lost)
        self.data["archive"] = archive

    def entry(self, series_uid: str) -> dict:
        return self.data["series"].get(series_uid) or {}

    def done(self, series_uid: str, key: str) -> Optional[dict]:
        """The entry of a series done (or set aside) with ``key``, else None."""
        entry = self.entry(series_uid)
        return entry if entry.get("key") == key and entry.get("status") in ("done", "skipped") else None

    def set_series(self, series_uid: str, *, key: str, name: str, status: str, cases: list[str],
                   channels: Optional[dict] = None) -> None:
        """``channels`` (studies of a multi-channel model): case id -> the series UID of each channel."""
        with self._lock:
            old = self.entry(series_uid)
            pushed = old.get("pushed", {}) if old.get("key") == key else {}
            self.data["series"][series_uid] = {"key": key, "name": name, "status": status, "cases": sorted(cases),
                                               "pushed": pushed}
            if channels:
                self.data["series"][series_uid]["channels"] = dict(channels)
            self.save()

    def set_skipped(self, series_uid: str, skipped: list[dict]) -> None:
        """What discovery set aside in the series (case id, source, reason), replayed when it is kept."""
        with self._lock:
            self.data["series"].setdefault(series_uid, {})["skipped"] = list(skipped)
            self.save()

    def pushed(self, series_uid: str) -> dict:
        return dict(self.entry(series_uid).get("pushed", {}))

    def set_pushed(self, series_uid: str, file_name: str, sha256: str) -> None:
        with self._lock:
            self.data["series"].setdefault(series_uid, {}).setdefault("pushed", {})[file_name] = sha256
            self.save()

    def save(self) -> None:
        with self._lock:
            write_json(self.data, self.path)
