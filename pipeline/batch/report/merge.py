"""``medseg manifest OUTPUT_DIR``: one manifest, lesion table and index page for a whole output folder.

It merges every manifest part (``manifest.json`` and the shards' ``manifest.shard-I-of-N.json``) with
the sidecars on disk: a sidecar whose mask exists is a ``done`` case (its lesions come from it), so the
reports can be rebuilt even when every manifest is lost. When several sources describe one case, the
most recently finished wins; a ``done`` row whose mask or sidecar has gone is reported ``failed``.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Union

from pipeline.batch.report.html import write_index_html
from pipeline.batch.report.lesions import Lesion, lesion_from_dict, write_lesions_csv
from pipeline.batch.report.lock import OutputLock
from pipeline.batch.report.manifest import ALL_COLUMNS, read_manifest_json, row_key, sort_rows, write_manifest
from pipeline.batch.report.outputs import SIDECAR_SUFFIX, CaseOutputs, RunFiles
from pipeline.batch.report.sidecar import read_sidecar
from pipeline.errors import InputError

log = logging.getLogger(__name__)


def row_from_sidecar(data: dict, output_dir: Path) -> dict:
    """The manifest row of a finished case, from its sidecar (paths re-rooted in ``output_dir``)."""
    row = {name: data.get(name) for name in ALL_COLUMNS}
    outputs = CaseOutputs(output_dir, str(data.get("case_id", "")))
    row.update(status="done", error="", output=str(outputs.mask), sidecar=str(outputs.sidecar),
               qc_png=str(outputs.qc_png) if outputs.qc_png.is_file() else "",
               dicom_seg=str(outputs.dicom_seg) if outputs.dicom_seg.is_file() else "",
               rtstruct=str(outputs.rtstruct) if outputs.rtstruct.is_file() else "")
    return row


def finished_sidecars(output_dir: Path) -> dict[str, dict]:
    """case id -> sidecar content, for every sidecar in ``output_dir`` whose mask exists."""
    found = {}
    for path in sorted(output_dir.glob(f"*{SIDECAR_SUFFIX}")):
        data = read_sidecar(path)
        if data is None or not data.get("case_id"):
            continue
        if CaseOutputs(output_dir, str(data["case_id"])).mask.is_file():
            found[str(data["case_id"])] = data
    return found


def rebuild_reports(output_dir: Union[str, Path]) -> list[dict]:
    """Write ``manifest.csv``/``.json``, ``lesions.csv`` and ``index.html`` for ``output_dir``; return rows."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise InputError(
            f"output folder not found: '{output_dir}'. Pass the OUTPUT_DIR given to `medseg segment`")
    files = RunFiles(output_dir)
    with OutputLock(files.lock, conflicts=files.conflicting_locks()):
        rows: dict[str, dict] = {}
        parts = sorted(output_dir.glob("manifest*.json"))
        for path in parts:
            try:
                _, part_rows = read_manifest_json(path)
            except (OSError, ValueError) as exc:
                log.warning("ignoring %s: %s", path, exc)
                continue
            for row in part_rows:
                _keep_newest(rows, row)
        sidecars = finished_sidecars(output_dir)
        for data in sidecars.values():
            _keep_newest(rows, row_from_sidecar(data, output_dir), on_tie=True)
        lesions: list[Lesion] = []
        for key, row in rows.items():
            if row.get("status") != "done":
                continue
            data = sidecars.get(str(row.get("case_id")))
            if data is None:
                rows[key] = {**row, "status": "failed", "lesion_count": None, "lesion_volume_ml": None,
                             "error": "its mask or sidecar is no longer in the output folder: run segment again"}
                continue
            lesions += [lesion_from_dict(d) for d in data.get("lesions") or []]
        if not rows:
            raise InputError(
                f"nothing to report in '{output_dir}': no manifest*.json and no <case>{SIDECAR_SUFFIX} "
                "sidecars. Run `medseg segment` into this folder first"
            )
        ordered = sort_rows(rows.values())
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        meta = {"output_dir": output_dir.resolve().name, "merged_from": [p.name for p in parts], "updated": now}
        write_manifest(ordered, files.manifest_csv, files.manifest_json, meta)
        write_lesions_csv(lesions, files.lesions_csv)
        write_index_html(ordered, output_dir)
    return ordered


def _keep_newest(rows: dict[str, dict], row: dict, on_tie: bool = False) -> None:
    key = row_key(row)
    old = rows.get(key)
    new_time, old_time = _when(row.get("finished")), _when((old or {}).get("finished"))
    if old is None or new_time > old_time or (on_tie and new_time == old_time):
        rows[key] = {name: row.get(name) for name in ALL_COLUMNS}


def _when(text) -> datetime.datetime:
    """A comparable time for an ISO 8601 string (with or without offset); the distant past if none."""
    try:
        when = datetime.datetime.fromisoformat(str(text))
    except ValueError:
        return datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    return when if when.tzinfo else when.astimezone()
