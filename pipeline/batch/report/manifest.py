"""The run manifest: one row per discovered case, as ``manifest.csv`` and ``manifest.json``.

Rows are plain dicts. The first :data:`MANIFEST_COLUMNS` are the contract (names and order fixed);
:data:`EXTRA_COLUMNS` follow. ``status`` is ``done`` (a mask and its sidecar exist; ``resumed`` tells
whether this run made them or an earlier one), ``skipped`` (discovery set it aside; ``error`` says why)
or ``failed`` (``error`` says why; nothing of the case is left in the output folder). A ``done`` case whose
DICOM SEG could not be written keeps its mask; ``dicom_seg_error`` says why the SEG is missing.
``model_sha256s``: the sha256 of every model of an ensemble, in order (one model: its own; ``model_sha256``
is then the ensemble's identity); ``tta``: none | mirror | mirror:AXES; ``probabilities``: the
``<case>_prob.nii.gz`` written (``probabilities_error``: why the one asked for is missing; the mask is
kept). Both files are
rewritten atomically after every case, so they always describe what is really on disk.

In the JSON, ``shape``/``spacing_mm`` are lists and missing values ``null``; in the CSV they are
written ``24x24x12`` / ``0.8x0.8x2.5`` and missing values are empty cells.
"""

from __future__ import annotations

import csv
import json
import math
import threading
from pathlib import Path
from typing import Iterable, Optional, Union

from pipeline.io.atomic import atomic_path, write_json

STATUSES = ("done", "skipped", "failed")

MANIFEST_COLUMNS = [
    "case_id", "source", "series_uid", "status", "error", "model_sha256",
    "seconds_load", "seconds_infer", "seconds_write", "shape", "spacing_mm",
    "lesion_count", "lesion_volume_ml",
]
EXTRA_COLUMNS = [
    "kind", "resumed", "seconds_post", "seconds", "output", "sidecar", "qc_png", "dicom_seg",
    "fingerprint", "started", "finished", "host", "dicom_seg_error", "channel_series_uids",
    "model_sha256s", "tta", "probabilities", "probabilities_error", "rtstruct", "rtstruct_error",
    "pushed", "push_error",  # archive runs (pipeline.archive): stored back with STOW-RS, or why not
]
ALL_COLUMNS = MANIFEST_COLUMNS + EXTRA_COLUMNS
MANIFEST_FORMAT = "medseg-manifest"


def row_key(row: dict) -> str:
    """What identifies a row: the case id, or the source for things discovery skipped without one."""
    return row.get("case_id") or f"source:{row.get('source', '')}"


def sort_rows(rows: Iterable[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (not r.get("case_id"), r.get("case_id") or "", r.get("source") or ""))


class Manifest:
    """Rows of one run (or one shard), saved atomically as CSV + JSON after every change."""

    def __init__(self, csv_path: Union[str, Path], json_path: Union[str, Path], meta: Optional[dict] = None):
        self.csv_path, self.json_path = Path(csv_path), Path(json_path)
        self.meta = dict(meta or {})
        self._rows: dict[str, dict] = {}
        self._lock = threading.Lock()

    def record(self, row: dict, save: bool = True) -> None:
        if row.get("status") not in STATUSES:
            raise ValueError(f"manifest status must be one of {STATUSES}, got {row.get('status')!r}")
        with self._lock:
            self._rows[row_key(row)] = {name: row.get(name) for name in ALL_COLUMNS}
            if save:
                self._save()

    def save(self) -> None:
        with self._lock:
            self._save()

    @property
    def rows(self) -> list[dict]:
        with self._lock:
            return sort_rows(self._rows.values())

    def _save(self) -> None:
        rows = sort_rows(self._rows.values())
        write_manifest(rows, self.csv_path, self.json_path, self.meta)


def write_manifest(rows: list[dict], csv_path: Path, json_path: Path, meta: Optional[dict] = None) -> None:
    """Write ``rows`` as CSV and JSON (each atomically)."""
    counts = {status: sum(r.get("status") == status for r in rows) for status in STATUSES}
    payload = {"format": MANIFEST_FORMAT, **(meta or {}), "counts": counts, "columns": ALL_COLUMNS,
               "cases": [{name: r.get(name) for name in ALL_COLUMNS} for r in rows]}
    write_json(payload, json_path, indent=1)
    with atomic_path(csv_path, suffix=".tmp.csv") as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(ALL_COLUMNS)
            for row in rows:
                writer.writerow([csv_cell(row.get(name), LIST_SEPARATORS.get(name, "x")) for name in ALL_COLUMNS])


def read_manifest_json(path: Union[str, Path]) -> tuple[dict, list[dict]]:
    """(meta, rows) of a ``manifest*.json``; raises ``ValueError`` for a file that is not one."""
    payload = json.loads(Path(path).read_text())
    if not isinstance(payload, dict) or payload.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"'{path}' is not a medseg manifest")
    rows = [dict(r) for r in payload.get("cases", []) if isinstance(r, dict)]
    meta = {k: v for k, v in payload.items() if k not in ("cases", "counts", "columns", "format")}
    return meta, rows


# lists of UIDs and hashes: "x" (as in shapes) would be ambiguous
LIST_SEPARATORS = {"channel_series_uids": ";", "model_sha256s": ";"}


def csv_cell(value, separator: str = "x") -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return separator.join(csv_cell(v) for v in value)
    return " ".join(str(value).split())  # one line per row, whatever the error message held
