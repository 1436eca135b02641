"""What a run still has to do: a case whose mask and sidecar (and QC picture, DICOM SEG) exist with the
same fingerprint (model, settings, package version, source files) is kept as ``done`` (``resumed``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipeline.batch.report.fingerprint import case_fingerprint
from pipeline.batch.report.lesions import lesion_from_dict, lesion_totals
from pipeline.batch.report.outputs import CaseOutputs
from pipeline.batch.report.sidecar import read_sidecar
from pipeline.batch.result import CaseResult, now
from pipeline.batch.runlog import run_log
from pipeline.io.discover import Case
from pipeline.io.privacy import Redactor

__all__ = ["Plan", "plan_run", "result_from_sidecar"]


@dataclass
class Plan:
    """``kept``: results known before any work (skipped by discovery, done by an earlier run), in the
    order they are recorded; ``todo``: (case, fingerprint) to be done."""

    kept: list[CaseResult] = field(default_factory=list)
    todo: list[tuple[Case, str]] = field(default_factory=list)


def plan_run(cases: list[Case], skipped, *, output_dir: Path, model_id: str, config, redact: Redactor,
             overwrite: bool, qc: bool, dicom_seg: bool, probabilities: Optional[str] = None,
             rtstruct: bool = False) -> Plan:
    """``probabilities``: the dtype of ``--save-probabilities`` (None: not asked), part of the fingerprint."""
    plan = Plan()
    for item in skipped:
        plan.kept.append(CaseResult(case_id=item.case_id, source=redact.path(item.source), status="skipped",
                                    error=redact.text(item.reason), series_uid=item.series_uid,
                                    finished=now()))
    for case in cases:
        fingerprint = case_fingerprint(model_id, config, case.files,
                                       {"probabilities": probabilities} if probabilities else None)
        previous = None if overwrite else _previous(case, fingerprint, output_dir, redact, qc, dicom_seg,
                                                    bool(probabilities), rtstruct)
        if previous is not None:
            plan.kept.append(previous)
            run_log.info("case %s: already done (same fingerprint), kept", case.case_id)
        else:
            plan.todo.append((case, fingerprint))
    return plan


def _previous(case: Case, fingerprint: str, output_dir: Path, redact: Redactor, qc: bool,
              dicom_seg: bool, probabilities: bool = False, rtstruct: bool = False) -> Optional[CaseResult]:
    """The result of an earlier run for ``case``, if its outputs are complete and match."""
    outputs = CaseOutputs(output_dir, case.case_id)
    data = read_sidecar(outputs.sidecar)
    if data is None or data.get("fingerprint") != fingerprint or not outputs.mask.is_file():
        return None
    if qc and not outputs.qc_png.is_file():
        return None
    if dicom_seg and case.kind == "dicom" and not outputs.dicom_seg.is_file() \
            and not data.get("dicom_seg_error"):  # a SEG that cannot be written is not retried
        return None
    if probabilities and not outputs.probabilities.is_file() and not data.get("probabilities_error"):
        return None
    if rtstruct and case.kind == "dicom" and not outputs.rtstruct.is_file() \
            and not data.get("rtstruct_error"):  # like the SEG: one that cannot be written is not retried
        return None
    result = _result_from_sidecar(data, case, outputs, redact.path(case.display_source))
    result.resumed = True
    return result


def result_from_sidecar(data: dict, case: Case, outputs: CaseOutputs, source: str) -> CaseResult:
    """The ``done`` result an earlier run recorded in a case's sidecar (``data``)."""
    return _result_from_sidecar(data, case, outputs, source)


def _result_from_sidecar(data: dict, case: Case, outputs: CaseOutputs, source: str) -> CaseResult:
    lesions = [lesion_from_dict(d) for d in data.get("lesions") or []]
    count, volume = lesion_totals(lesions)
    timing = {n: float(data.get(n) or 0.0) for n in ("seconds_load", "seconds_infer", "seconds_post",
                                                      "seconds_write", "seconds")}
    return CaseResult(
        case.case_id, source, "done", output=str(outputs.mask), shape=tuple(data.get("shape") or ()),
        series_uid=case.series_uid, kind=case.kind, spacing_mm=tuple(data.get("spacing_mm") or ()),
        lesion_count=count, lesion_volume_ml=volume, fingerprint=str(data.get("fingerprint")),
        model_sha256=str(data.get("model_sha256") or ""), sidecar=str(outputs.sidecar),
        qc_png=str(outputs.qc_png) if outputs.qc_png.is_file() else "",
        dicom_seg=str(outputs.dicom_seg) if outputs.dicom_seg.is_file() else "",
        dicom_seg_error="" if outputs.dicom_seg.is_file() else str(data.get("dicom_seg_error") or ""),
        started=str(data.get("started") or ""), finished=str(data.get("finished") or ""),
        host=str(data.get("host") or ""), lesions=lesions, channel_series_uids=list(case.channel_series_uids),
        model_sha256s=list(data.get("model_sha256s") or []), tta=str(data.get("tta") or ""),
        probabilities=str(outputs.probabilities) if outputs.probabilities.is_file() else "",
        probabilities_error="" if outputs.probabilities.is_file() else str(data.get("probabilities_error") or ""),
        rtstruct=str(outputs.rtstruct) if outputs.rtstruct.is_file() else "",
        rtstruct_error="" if outputs.rtstruct.is_file() else str(data.get("rtstruct_error") or ""),
        **timing,
    )
