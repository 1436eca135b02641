"""Lesion-wise detection: connected components of ground truth and prediction, matched by overlap.

Definitions (documented in the README):
* Lesions are 26-connected components (full connectivity) of the mask.
* For a ground-truth lesion ``g``, let ``P(g)`` be the union of the predicted components that overlap it.
  ``g`` is *detected* (a true positive) when ``P(g)`` is not empty and
  IoU(g, P(g)) = |g ∩ P(g)| / |g ∪ P(g)| ≥ ``min_overlap_iou``. With the default 0, any overlap of one
  voxel detects a lesion. Using the union of the overlapping components means a lesion that the
  prediction splits into pieces is judged by all its pieces together.
* A predicted component is a *false positive* when it overlaps no detected ground-truth lesion (with the
  default 0: no ground-truth lesion at all; with a threshold, a poorly overlapping component is a false
  positive and the lesion it touches a false negative).
* ``tp`` counts ground-truth lesions, ``fp`` predicted components: precision = tp / (tp + fp),
  recall = tp / lesions_gt, F1 = 2 tp / (2 tp + fp + fn); NaN where the denominator is 0. One predicted
  component covering two lesions gives two true positives.
* Size bins: ground-truth lesions (lesions_gt, tp, fn) are binned by their own volume in mm³, predicted
  components (lesions_pred, fp) by theirs. With edges (100, 1000) the bins are ``lt100`` (< 100 mm³),
  ``100to1000`` (100 ≤ v < 1000) and ``ge1000`` (≥ 1000 mm³).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pipeline.evaluate.metrics import safe_ratio
from pipeline.postprocess.components import label_components

DEFAULT_SIZE_BINS_MM3 = (100.0, 1000.0)
BIN_COUNTS = ("lesions_gt", "lesion_tp", "lesion_fn", "lesions_pred", "lesion_fp")


@dataclass
class Detection:
    lesions_gt: int
    lesions_pred: int
    tp: int  # ground-truth lesions detected
    fn: int  # ground-truth lesions missed
    fp: int  # predicted components that overlap no detected ground-truth lesion
    # per size bin name (see size_bin_names): {"lesions_gt": .., "lesion_tp": .., "lesion_fn": ..,
    # "lesions_pred": .., "lesion_fp": ..}
    by_size: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def precision(self) -> float:
        return safe_ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return safe_ratio(self.tp, self.lesions_gt)

    @property
    def f1(self) -> float:
        return safe_ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)


def size_bin_names(edges_mm3: Sequence[float]) -> list[str]:
    """Column-friendly names of the bins cut at ``edges_mm3``: ``lt100``, ``100to1000``, ``ge1000``."""
    edges = [f"{float(e):g}" for e in edges_mm3]
    if not edges:
        return ["all"]
    return [f"lt{edges[0]}"] + [f"{a}to{b}" for a, b in zip(edges, edges[1:])] + [f"ge{edges[-1]}"]


def check_size_bins(edges_mm3: Sequence[float]) -> tuple[float, ...]:
    edges = tuple(float(e) for e in edges_mm3)
    if any(not np.isfinite(e) or e <= 0 for e in edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"size bin edges must be positive and increasing (mm³), got {list(edges_mm3)}")
    return edges


def lesion_detection(pred: np.ndarray, truth: np.ndarray, voxel_volume_mm3: float = 1.0,
                     min_overlap_iou: float = 0.0,
                     size_bins_mm3: Sequence[float] = DEFAULT_SIZE_BINS_MM3) -> Detection:
    if not 0.0 <= min_overlap_iou <= 1.0:
        raise ValueError(f"min_overlap_iou must be in [0, 1], got {min_overlap_iou}")
    edges = check_size_bins(size_bins_mm3)
    gt_labels, n_gt = label_components(truth)
    pred_labels, n_pred = label_components(pred)
    gt_size = np.bincount(gt_labels.ravel(), minlength=n_gt + 1)
    pred_size = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)

    # Every overlapping (gt, pred) component pair with its intersection in voxels.
    both = (gt_labels > 0) & (pred_labels > 0)
    pair_code = gt_labels[both].astype(np.int64) * (n_pred + 1) + pred_labels[both]
    codes, inter = np.unique(pair_code, return_counts=True)
    g, p = codes // (n_pred + 1), codes % (n_pred + 1)

    # IoU of each gt lesion with the union of the predicted components overlapping it.
    inter_g = np.bincount(g, weights=inter, minlength=n_gt + 1)
    pred_union_g = np.bincount(g, weights=pred_size[p], minlength=n_gt + 1)
    union_g = gt_size + pred_union_g - inter_g
    iou_g = np.divide(inter_g, union_g, out=np.zeros(n_gt + 1), where=union_g > 0)
    detected = (inter_g > 0) & (iou_g >= min_overlap_iou)
    detected[0] = False
    matched_pred = np.zeros(n_pred + 1, bool)
    matched_pred[p[detected[g]]] = True

    tp = int(detected.sum())
    fp_mask = ~matched_pred
    fp_mask[0] = False
    by_size = _by_size(edges, gt_size * voxel_volume_mm3, detected, pred_size * voxel_volume_mm3, fp_mask)
    return Detection(lesions_gt=n_gt, lesions_pred=n_pred, tp=tp, fn=n_gt - tp, fp=int(fp_mask.sum()),
                     by_size=by_size)


def _by_size(edges, gt_mm3, detected, pred_mm3, fp_mask) -> dict[str, dict[str, int]]:
    names = size_bin_names(edges)
    gt_bin = np.searchsorted(edges, gt_mm3[1:], side="right")
    pred_bin = np.searchsorted(edges, pred_mm3[1:], side="right")
    detected, fp_mask = detected[1:], fp_mask[1:]
    out = {}
    for k, name in enumerate(names):
        in_gt, in_pred = gt_bin == k, pred_bin == k
        out[name] = {
            "lesions_gt": int(in_gt.sum()),
            "lesion_tp": int((in_gt & detected).sum()),
            "lesion_fn": int((in_gt & ~detected).sum()),
            "lesions_pred": int(in_pred.sum()),
            "lesion_fp": int((in_pred & fp_mask).sum()),
        }
    return out
