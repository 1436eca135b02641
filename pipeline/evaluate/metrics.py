"""Overlap and volume metrics for evaluation. Dice and the per-case Dice are :mod:`pipeline.metrics`'s (shared
with training validation), re-exported here.

Conventions (documented in the README):
* Dice and IoU of two empty masks are 1.0 (nothing to find, nothing found); of one empty mask 0.0.
* Any non-zero voxel is foreground; callers select a label with ``mask == label`` first.

Surface distances live in :mod:`pipeline.evaluate.surface`, lesion-wise detection in
:mod:`pipeline.evaluate.lesions` (import them from there, or from :mod:`pipeline.evaluate`).
"""

from __future__ import annotations

import numpy as np

from pipeline.metrics import case_dice, dice

__all__ = ["case_dice", "dice", "iou", "safe_ratio", "volume_ml"]


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard index); 1.0 when both masks are empty."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    union = int(np.count_nonzero(pred | truth))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & truth)) / union


def volume_ml(mask: np.ndarray, spacing) -> float:
    """Volume of the foreground in millilitres (voxel count × voxel volume in mm³ / 1000)."""
    return int(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def safe_ratio(num: float, den: float) -> float:
    """num / den, NaN when den is 0 (e.g. recall with no ground-truth lesion)."""
    return float(num) / float(den) if den else float("nan")

