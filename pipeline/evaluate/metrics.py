"""Segmentation metrics. The one implementation used by training validation, the demo and evaluate.

Conventions (documented in the README):
* Dice of two empty masks is 1.0 (nothing to find, nothing found); of one empty mask 0.0.
* Lesions are 26-connected components. A ground-truth lesion is *detected* when a predicted component
  overlaps it by at least one voxel; a predicted component overlapping no ground-truth lesion is a
  false positive.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.postprocess.components import label_components


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


@dataclass
class Detection:
    lesions_gt: int
    lesions_pred: int
    tp: int  # ground-truth lesions detected
    fn: int  # ground-truth lesions missed
    fp: int  # predicted components that overlap no ground-truth lesion


def lesion_detection(pred: np.ndarray, truth: np.ndarray) -> Detection:
    gt_labels, n_gt = label_components(truth)
    pred_labels, n_pred = label_components(pred)
    overlap = (gt_labels > 0) & (pred_labels > 0)
    detected_gt = np.unique(gt_labels[overlap])
    matched_pred = np.unique(pred_labels[overlap])
    tp = int(detected_gt.size)
    return Detection(
        lesions_gt=n_gt,
        lesions_pred=n_pred,
        tp=tp,
        fn=n_gt - tp,
        fp=n_pred - int(matched_pred.size),
    )


def safe_ratio(num: float, den: float) -> float:
    """num / den, NaN when den is 0 (e.g. recall with no ground-truth lesion)."""
    return float(num) / float(den) if den else float("nan")
