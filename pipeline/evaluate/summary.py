"""Pooling per-case rows into ``summary.json``.

* Top level (what the demo prints): ``mean_dice`` / ``median_dice`` over the rows whose ground truth has
  lesions (``n_cases_with_lesions``); lesion counts pooled over all rows, and precision, recall and F1 of
  the pooled counts (so cases without lesions count through their false positives); edge-case counts.
* ``per_label``: for each label, mean / median / sample std of every per-case metric over all cases,
  NaN values left out and counted (``n``: values used, ``n_nan``: left out); the pooled lesion counts;
  the pooled counts per size bin (``size_bins``) with the detection rate (recall) of each bin.

Edge-case counts: ``n_both_empty`` (label in neither mask: Dice 1, distances 0), ``n_empty_pred``
(ground truth has the label, prediction not: Dice 0, distances NaN), ``n_empty_gt`` (prediction only),
``n_distance_undefined`` = ``n_empty_pred + n_empty_gt``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from pipeline.evaluate.case import CaseMetrics
from pipeline.evaluate.lesions import BIN_COUNTS
from pipeline.evaluate.metrics import safe_ratio

STAT_METRICS = (
    "dice", "iou", "hd95_mm", "assd_mm", "nsd", "volume_pred_ml", "volume_gt_ml", "volume_diff_ml",
    "lesion_precision", "lesion_recall", "lesion_f1",
)


def summarise(rows: Sequence[CaseMetrics]) -> dict:
    with_lesions = [r.dice for r in rows if r.lesions_gt > 0]
    labels = sorted({r.label for r in rows})
    return {
        "n_cases": len({r.case_id for r in rows}),
        "labels": labels,
        "mean_dice": float(np.mean(with_lesions)) if with_lesions else math.nan,
        "median_dice": float(np.median(with_lesions)) if with_lesions else math.nan,
        "n_cases_with_lesions": len(with_lesions),
        **pooled_counts(rows),
        "per_label": {str(label): label_summary([r for r in rows if r.label == label]) for label in labels},
    }


def label_summary(rows: Sequence[CaseMetrics]) -> dict:
    return {
        "n_cases": len(rows),
        "metrics": {name: describe([getattr(r, name) for r in rows]) for name in STAT_METRICS},
        **pooled_counts(rows),
    }


def pooled_counts(rows: Sequence[CaseMetrics]) -> dict:
    tp, fp, fn = (sum(getattr(r, k) for r in rows) for k in ("lesion_tp", "lesion_fp", "lesion_fn"))
    empty_pred = sum(r.pred_empty and not r.gt_empty for r in rows)
    empty_gt = sum(r.gt_empty and not r.pred_empty for r in rows)
    return {
        "lesions_gt": sum(r.lesions_gt for r in rows),
        "lesions_pred": sum(r.lesions_pred for r in rows),
        "lesion_tp": tp,
        "lesion_fp": fp,
        "lesion_fn": fn,
        "lesion_precision": safe_ratio(tp, tp + fp),
        "lesion_recall": safe_ratio(tp, tp + fn),
        "lesion_f1": safe_ratio(2 * tp, 2 * tp + fp + fn),
        "false_positive_lesions_in_empty_cases": sum(r.lesion_fp for r in rows if r.lesions_gt == 0),
        "n_both_empty": sum(r.pred_empty and r.gt_empty for r in rows),
        "n_empty_pred": empty_pred,
        "n_empty_gt": empty_gt,
        "n_distance_undefined": empty_pred + empty_gt,
        "size_bins": pooled_size_bins(rows),
    }


def pooled_size_bins(rows: Sequence[CaseMetrics]) -> dict:
    out: dict[str, dict] = {}
    for row in rows:
        for name, counts in row.by_size.items():
            pooled = out.setdefault(name, {count: 0 for count in BIN_COUNTS})
            for count in BIN_COUNTS:
                pooled[count] += counts[count]
    for pooled in out.values():
        pooled["lesion_recall"] = safe_ratio(pooled["lesion_tp"], pooled["lesions_gt"])
    return out


def describe(values: Sequence[float]) -> dict:
    """mean, median, sample std (ddof 1) of the non-NaN values; n used, n_nan left out."""
    array = np.asarray(values, dtype=np.float64)
    finite = array[~np.isnan(array)]
    n = int(finite.size)
    return {
        "mean": float(finite.mean()) if n else math.nan,
        "median": float(np.median(finite)) if n else math.nan,
        "std": float(finite.std(ddof=1)) if n > 1 else math.nan,
        "n": n,
        "n_nan": int(array.size - n),
    }
