"""Evaluation: overlap, surface distances and lesion-wise detection, per case and label, and pooled.

* :mod:`~pipeline.evaluate.metrics` — Dice, IoU, volume (also used by training validation)
* :mod:`~pipeline.evaluate.surface` — HD95, ASSD, NSD in mm from surface voxels
* :mod:`~pipeline.evaluate.lesions` — lesion-wise detection with size bins
* :mod:`~pipeline.evaluate.case` — all metrics of one case (one row per label)
* :mod:`~pipeline.evaluate.folder` — pairing folders of masks, grid checks, evaluating them
* :mod:`~pipeline.evaluate.summary`, :mod:`~pipeline.evaluate.report`, :mod:`~pipeline.evaluate.plots`
"""

from pipeline.evaluate.case import COLUMNS, CaseMetrics, EvaluationOptions, evaluate_arrays, evaluate_masks
from pipeline.evaluate.folder import evaluate_case, evaluate_folder
from pipeline.evaluate.lesions import Detection, lesion_detection
from pipeline.evaluate.metrics import dice, iou
from pipeline.evaluate.report import write_report
from pipeline.evaluate.summary import summarise
from pipeline.evaluate.surface import SurfaceDistances, assd, hd95, nsd, surface_distances

__all__ = [
    "COLUMNS", "CaseMetrics", "Detection", "EvaluationOptions", "SurfaceDistances", "assd", "dice",
    "evaluate_arrays", "evaluate_case", "evaluate_folder", "evaluate_masks", "hd95", "iou",
    "lesion_detection", "nsd", "summarise", "surface_distances", "write_report",
]
