"""A case of a batch run: on its way through the stages (:class:`InFlight`), and finished (:class:`CaseResult`).

``summarise`` and ``exit_code`` read a run's results; ``now`` is the run's time stamp (ISO 8601).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Optional

from pipeline.batch.report.manifest import ALL_COLUMNS
from pipeline.io.discover import Case

__all__ = ["CaseResult", "InFlight", "exit_code", "now", "summarise"]


@dataclass
class CaseResult:
    """One case of a run: a manifest row (see :data:`pipeline.batch.report.manifest.ALL_COLUMNS`) + its lesions."""

    case_id: str
    source: str
    status: str  # done | skipped | failed
    output: str = ""
    error: str = ""
    seconds: float = 0.0
    shape: tuple = ()
    series_uid: str = ""
    kind: str = ""
    spacing_mm: tuple = ()
    lesion_count: Optional[int] = None
    lesion_volume_ml: Optional[float] = None
    seconds_load: float = 0.0
    seconds_infer: float = 0.0
    seconds_post: float = 0.0  # probabilities back to the source grid, labels, lesion statistics
    seconds_write: float = 0.0  # mask, DICOM SEG, QC picture, sidecar
    resumed: bool = False  # done by an earlier run with the same fingerprint
    fingerprint: str = ""
    model_sha256: str = ""
    sidecar: str = ""
    qc_png: str = ""
    dicom_seg: str = ""
    started: str = ""
    finished: str = ""
    host: str = ""
    channel_series_uids: list = field(default_factory=list)  # DICOM studies: each channel's series UID
    dicom_seg_error: str = ""  # why the DICOM SEG asked for was not written (the mask is kept)
    model_sha256s: list = field(default_factory=list)  # every model of an ensemble, in order
    tta: str = ""  # none | mirror | mirror:AXES
    probabilities: str = ""  # <case>_prob.nii.gz, when asked for and written
    probabilities_error: str = ""  # why the probabilities asked for were not written (the mask is kept)
    rtstruct: str = ""  # <case>_rtstruct.dcm, when asked for (--rtstruct) and written
    rtstruct_error: str = ""  # why the RTSTRUCT asked for was not written (the mask is kept)
    pushed: Optional[bool] = None  # archive runs with --push: every SEG/RTSTRUCT of the case stored back
    push_error: str = ""  # archive runs: why a file of the case could not be stored back
    lesions: list = field(default_factory=list, repr=False)  # list[Lesion]

    def to_row(self) -> dict:
        row = {name: getattr(self, name, None) for name in ALL_COLUMNS}
        row["shape"] = list(self.shape) or None
        row["spacing_mm"] = [round(float(s), 6) for s in self.spacing_mm] or None
        row["channel_series_uids"] = list(self.channel_series_uids) or None
        row["model_sha256s"] = list(self.model_sha256s) or None
        for name in ("seconds_load", "seconds_infer", "seconds_post", "seconds_write", "seconds"):
            row[name] = None if self.status == "skipped" else round(row[name], 4)
        return row


@dataclass
class InFlight:
    """A case on its way through the stages."""

    case: Case
    fingerprint: str
    started: str = ""
    prepared: object = None
    probs: object = None
    error: Optional[BaseException] = None
    seconds_load: float = 0.0
    seconds_infer: float = 0.0


def summarise(results: list[CaseResult]) -> dict:
    done = [r for r in results if r.status == "done"]
    return {
        "done": len(done), "resumed": sum(r.resumed for r in done),
        "skipped": sum(r.status == "skipped" for r in results),
        "failed": sum(r.status == "failed" for r in results),
        "lesions": sum(r.lesion_count or 0 for r in done),
        "lesion_volume_ml": sum(r.lesion_volume_ml or 0.0 for r in done),
    }


def exit_code(results: list[CaseResult]) -> int:
    """0: every case done or skipped; 1: some failed; 2: some failed and none succeeded."""
    s = summarise(results)
    if s["failed"] and not s["done"]:
        return 2
    return 1 if s["failed"] else 0


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="milliseconds")
