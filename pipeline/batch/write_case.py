"""One finished case into its files: mask, DICOM SEG, probabilities, QC picture and, last, the sidecar.

Every file is written to a temporary name and renamed; the sidecar is removed first and written last,
so the case counts as unfinished until all of its files are complete.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from typing import Optional

from pipeline.batch.report.lesions import lesion_stats, lesion_totals
from pipeline.batch.report.outputs import CaseOutputs
from pipeline.batch.report.sidecar import write_sidecar
from pipeline.batch.result import CaseResult, InFlight, now
from pipeline.errors import InputError, describe_error
from pipeline.infer.segmenter import Segmenter
from pipeline.io.discover import Case
from pipeline.io.geometry import voxel_spacing
from pipeline.io.privacy import Redactor
from pipeline.io.probabilities import write_probabilities
from pipeline.io.write import write_mask

log = logging.getLogger(__name__)

__all__ = ["CaseWriter", "dicom_seg_writer"]


class CaseWriter:
    """Finishes a case (probabilities → labels in the source grid, lesion statistics) and writes its files.

    ``model``: the checkpoint path of the run (the sidecar's ``model``); ``config_dict``, ``versions``:
    what the sidecar records of the settings and the software. ``probabilities``: ``uint8 | float16`` to
    write ``<case>_prob.nii.gz`` (:mod:`pipeline.io.probabilities`), None for none.
    """

    def __init__(self, segmenter: Segmenter, *, redact: Redactor, dicom_seg: bool, qc: bool, host: str,
                 model: str, config_dict: dict, versions: dict, probabilities: Optional[str] = None,
                 rtstruct: bool = False):
        self.segmenter, self.redact = segmenter, redact
        self.probabilities = probabilities
        self.dicom_seg, self.qc = dicom_seg, qc
        self.rtstruct = rtstruct
        self.host, self.model, self.config_dict, self.versions = host, model, config_dict, versions

    def write(self, item: InFlight, outputs: CaseOutputs) -> CaseResult:
        case, config = item.case, self.segmenter.config
        start = time.perf_counter()
        seg = self.segmenter.finish(item.probs, item.prepared)
        item.prepared = item.probs = None
        lesions = lesion_stats(seg.labels, seg.affine, image=seg.image, probability=seg.foreground,
                               case_id=case.case_id)
        count, volume = lesion_totals(lesions)
        seconds_post = time.perf_counter() - start

        start = time.perf_counter()
        outputs.sidecar.unlink(missing_ok=True)  # the case counts as unfinished until the new sidecar
        write_mask(seg.labels, seg.affine, outputs.mask, source=case.source if case.kind == "nifti" else None)
        wants_seg = self.dicom_seg and case.kind == "dicom"
        seg_error = self._write_dicom_seg(case, seg, outputs) if wants_seg else ""
        wants_rtstruct = self.rtstruct and case.kind == "dicom"
        rtstruct_error = self._write_rtstruct(case, seg, outputs) if wants_rtstruct else ""
        prob_error = self._write_probabilities(case, seg, outputs) if self.probabilities else ""
        if self.qc:
            from pipeline.batch.report.qc import display_window, write_qc_png

            largest = max(lesions, key=lambda lesion: lesion.voxels, default=None)
            intensity = config.preprocess.intensity
            window = display_window(seg.image, intensity.mode, intensity.window)
            write_qc_png(outputs.qc_png, seg.image, seg.labels, seg.affine,
                         centre_mm=None if largest is None else largest.centroid_mm, window=window,
                         title=f"{case.case_id}: {count} lesion(s), {volume:.2f} mL")
        result = CaseResult(
            case.case_id, self.redact.path(case.display_source), "done", output=str(outputs.mask),
            shape=tuple(int(s) for s in seg.labels.shape), series_uid=case.series_uid, kind=case.kind,
            spacing_mm=tuple(float(s) for s in voxel_spacing(seg.affine)), lesion_count=count,
            lesion_volume_ml=volume, seconds_load=item.seconds_load, seconds_infer=item.seconds_infer,
            seconds_post=seconds_post, fingerprint=item.fingerprint, model_sha256=self.segmenter.model_sha256,
            sidecar=str(outputs.sidecar), qc_png=str(outputs.qc_png) if self.qc else "",
            dicom_seg=str(outputs.dicom_seg) if wants_seg and not seg_error else "",
            dicom_seg_error=seg_error, started=item.started, host=self.host, lesions=lesions,
            channel_series_uids=list(case.channel_series_uids),
            model_sha256s=[s for s in self.segmenter.model_sha256s if s], tta=self.segmenter.tta,
            probabilities=str(outputs.probabilities) if self.probabilities and not prob_error else "",
            probabilities_error=prob_error,
            rtstruct=str(outputs.rtstruct) if wants_rtstruct and not rtstruct_error else "",
            rtstruct_error=rtstruct_error,
        )
        result.seconds_write = time.perf_counter() - start
        result.seconds = result.seconds_load + result.seconds_infer + result.seconds_post + result.seconds_write
        result.finished = now()
        write_sidecar(outputs.sidecar, self._sidecar(result, case, seg.affine))  # last: the case is finished
        return result

    def _write_dicom_seg(self, case: Case, seg, outputs: CaseOutputs) -> str:
        """Write the case's DICOM SEG; a SEG that cannot be written never costs the case its mask: the
        reason is returned (for ``dicom_seg_error``) and logged, and the case stays done."""
        try:
            dicom_seg_writer()(seg.labels, seg.affine, case.reference_files, outputs.dicom_seg,
                               self.segmenter.config.label_names, **self._dicom_identity())
        except Exception as exc:  # any SEG failure (unsupported source, highdicom, disk) is secondary
            outputs.dicom_seg.unlink(missing_ok=True)
            reason = describe_error(exc)
            log.warning("%s: DICOM SEG not written (the mask is): %s", case.case_id, reason)
            return reason
        return ""

    def _write_rtstruct(self, case: Case, seg, outputs: CaseOutputs) -> str:
        """Write ``<case>_rtstruct.dcm`` (one ROI per label) on channel 0's series. Secondary, as the SEG: a
        failure is returned (for ``rtstruct_error``) and logged, and the case keeps its mask."""
        try:
            from pipeline.io.rtstruct import write_rtstruct

            write_rtstruct(seg.labels, seg.affine, case.reference_files, outputs.rtstruct,
                           self.segmenter.config.label_names, **self._dicom_identity(),
                           rois=getattr(getattr(self.segmenter.config, "output", None), "rtstruct_rois", "label"))
        except Exception as exc:  # unsupported source, disk: secondary to the mask
            outputs.rtstruct.unlink(missing_ok=True)
            reason = describe_error(exc)
            log.warning("%s: RTSTRUCT not written (the mask is): %s", case.case_id, reason)
            return reason
        return ""

    def _dicom_identity(self) -> dict:
        """What a SEG/RTSTRUCT records of the model: its sha256 and the configured anatomic region."""
        output = getattr(self.segmenter.config, "output", None)
        return {"model_sha256": self.segmenter.model_sha256 or "",
                "anatomic_region": getattr(output, "anatomic_region", "") or ""}

    def _write_probabilities(self, case: Case, seg, outputs: CaseOutputs) -> str:
        """Write ``<case>_prob.nii.gz`` (binary models: P(lesion), 3D; more classes: one channel per
        class, 4D) in the mask's geometry. Secondary, as the DICOM SEG: a failure is returned (for
        ``probabilities_error``) and logged, and the case keeps its mask."""
        try:
            values = seg.class_probabilities if seg.class_probabilities is not None else seg.foreground
            write_probabilities(values, seg.affine, outputs.probabilities, self.probabilities)
        except Exception as exc:  # disk, memory: secondary to the mask
            outputs.probabilities.unlink(missing_ok=True)
            reason = describe_error(exc)
            log.warning("%s: probabilities not written (the mask is): %s", case.case_id, reason)
            return reason
        return ""

    def _sidecar(self, result: CaseResult, case: Case, affine) -> dict:
        row = result.to_row()
        row.pop("status"), row.pop("error"), row.pop("resumed"), row.pop("sidecar")
        return {**row, "model": self.model, "models": list(self.segmenter.model_paths),
                "source_files": len(case.files),
                "affine": [[round(float(v), 6) for v in r] for r in affine], "config": self.config_dict,
                "versions": self.versions, "lesions": [asdict(lesion) for lesion in result.lesions],
                "assumptions": list(case.volume.assumptions) if case.volume is not None else []}


def dicom_seg_writer():
    """The DICOM SEG writer, or an :class:`~pipeline.errors.InputError` saying why it is not available."""
    try:
        from pipeline.io.dicom_seg import write_dicom_seg
    except ImportError as exc:
        raise InputError(f"DICOM SEG output is not available in this installation ({exc}): "
                         "run without --dicom-seg, or install medseg with highdicom") from None
    return write_dicom_seg
