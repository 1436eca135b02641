"""All metrics of one case: per label, from two label arrays on the same grid and its voxel spacing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from pipeline.errors import InputError
from pipeline.evaluate.lesions import BIN_COUNTS, DEFAULT_SIZE_BINS_MM3, check_size_bins, lesion_detection
from pipeline.evaluate.metrics import dice, iou, volume_ml
from pipeline.evaluate.surface import as_mask, surface_distances, union_bbox

# The metrics.csv contract: these columns, in this order, then the size-bin counts.
COLUMNS = (
    "case_id", "label", "dice", "iou", "hd95_mm", "assd_mm", "nsd", "volume_pred_ml", "volume_gt_ml",
    "volume_diff_ml", "lesions_gt", "lesions_pred", "lesion_tp", "lesion_fp", "lesion_fn", "lesion_precision",
    "lesion_recall", "lesion_f1",
)


@dataclass(frozen=True)
class EvaluationOptions:
    labels: Optional[tuple[int, ...]] = None  # None: every foreground label found in any GT or prediction
    nsd_tolerance_mm: float = 1.0
    min_overlap_iou: float = 0.0  # 0: any overlap detects a lesion
    size_bins_mm3: tuple[float, ...] = DEFAULT_SIZE_BINS_MM3
    plots: bool = True  # PNG plots beside metrics.csv when an output folder is given

    def __post_init__(self):
        if self.labels is not None:
            labels = tuple(int(v) for v in self.labels)
            if not labels or any(v <= 0 for v in labels):
                raise InputError(f"labels must be foreground values (integers > 0), got {list(self.labels)}")
            object.__setattr__(self, "labels", tuple(sorted(set(labels))))
        if not (np.isfinite(self.nsd_tolerance_mm) and self.nsd_tolerance_mm >= 0):
            raise InputError(f"NSD tolerance must be a distance ≥ 0 mm, got {self.nsd_tolerance_mm}")
        if not 0.0 <= self.min_overlap_iou <= 1.0:
            raise InputError(f"minimum overlap IoU must be in [0, 1], got {self.min_overlap_iou}")
        try:
            object.__setattr__(self, "size_bins_mm3", check_size_bins(self.size_bins_mm3))
        except ValueError as exc:
            raise InputError(str(exc)) from None


@dataclass
class CaseMetrics:
    """One row of metrics.csv: one case, one label."""

    case_id: str
    label: int
    dice: float
    iou: float
    hd95_mm: float
    assd_mm: float
    nsd: float
    volume_pred_ml: float
    volume_gt_ml: float
    volume_diff_ml: float  # pred - gt
    lesions_gt: int
    lesions_pred: int
    lesion_tp: int
    lesion_fp: int
    lesion_fn: int
    lesion_precision: float
    lesion_recall: float
    lesion_f1: float
    by_size: dict[str, dict[str, int]] = field(default_factory=dict)  # bin name → counts (lesions.py)

    @property
    def gt_empty(self) -> bool:
        return self.volume_gt_ml == 0

    @property
    def pred_empty(self) -> bool:
        return self.volume_pred_ml == 0

    def as_row(self) -> dict:
        """The CSV row: the contract columns, then ``<count>_<bin>`` for each size bin."""
        row = {name: getattr(self, name) for name in COLUMNS}
        for bin_name, counts in self.by_size.items():
            for count in BIN_COUNTS:
                row[f"{count}_{bin_name}"] = counts[count]
        return row


def evaluate_masks(case_id: str, label: int, pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                   options: EvaluationOptions = EvaluationOptions()) -> CaseMetrics:
    """Metrics of one binary prediction against one binary ground truth (any non-zero is foreground)."""
    pred, truth = as_mask(pred), as_mask(truth)
    box = union_bbox(pred, truth, margin=1)
    if box is not None:  # everything below only needs the region holding both masks
        pred, truth = pred[box], truth[box]
    spacing = np.asarray(spacing, dtype=np.float64)
    distances = surface_distances(pred, truth, spacing)
    detection = lesion_detection(pred, truth, voxel_volume_mm3=float(np.prod(spacing)),
                                 min_overlap_iou=options.min_overlap_iou, size_bins_mm3=options.size_bins_mm3)
    vol_pred, vol_gt = volume_ml(pred, spacing), volume_ml(truth, spacing)
    return CaseMetrics(
        case_id=case_id,
        label=int(label),
        dice=dice(pred, truth),
        iou=iou(pred, truth),
        hd95_mm=distances.hausdorff(95.0),
        assd_mm=distances.average(),
        nsd=distances.surface_dice(options.nsd_tolerance_mm),
        volume_pred_ml=vol_pred,
        volume_gt_ml=vol_gt,
        volume_diff_ml=vol_pred - vol_gt,
        lesions_gt=detection.lesions_gt,
        lesions_pred=detection.lesions_pred,
        lesion_tp=detection.tp,
        lesion_fp=detection.fp,
        lesion_fn=detection.fn,
        lesion_precision=detection.precision,
        lesion_recall=detection.recall,
        lesion_f1=detection.f1,
        by_size=detection.by_size,
    )


def evaluate_arrays(case_id: str, pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                    labels: Sequence[int],
                    options: EvaluationOptions = EvaluationOptions()) -> list[CaseMetrics]:
    """One row per label in ``labels`` for two label arrays on the same grid."""
    return [evaluate_masks(case_id, label, pred == label, truth == label, spacing, options)
            for label in labels]


def labels_present(array: np.ndarray) -> set[int]:
    """Foreground values in a label array (bincount for small non-negative integers: no sort)."""
    array = np.asarray(array)
    if array.size == 0:
        return set()
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low >= 0 and high < 1 << 16:
            flat, counts = array.reshape(-1), np.zeros(high + 1, np.int64)
            for start in range(0, flat.size, 1 << 22):  # chunks: bincount casts to int64
                counts += np.bincount(flat[start:start + (1 << 22)], minlength=high + 1)
            return {int(v) for v in np.flatnonzero(counts) if v > 0}
    return {int(v) for v in np.unique(array) if v > 0}
