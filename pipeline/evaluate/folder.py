"""Evaluating a folder of predicted masks against ground truth, case by case."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import nibabel as nib
import numpy as np

from pipeline.errors import InputError
from pipeline.evaluate.metrics import dice, lesion_detection, safe_ratio

log = logging.getLogger(__name__)

PRED_SUFFIX = "_seg.nii.gz"


@dataclass
class CaseMetrics:
    case_id: str
    dice: float  # foreground (all lesion labels) Dice
    lesions_gt: int
    lesions_pred: int
    lesion_tp: int
    lesion_fp: int
    lesion_fn: int
    voxels_gt: int
    voxels_pred: int


def evaluate_folder(
    pred_dir: Union[str, Path], gt_dir: Union[str, Path], out_dir: Optional[Union[str, Path]] = None
) -> tuple[list[CaseMetrics], dict]:
    """Match ``<case>_seg.nii.gz`` in ``pred_dir`` to ``<case>.nii.gz`` in ``gt_dir``; return rows and summary."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    pairs = _pairs(pred_dir, gt_dir)
    rows = [evaluate_case(case_id, pred, gt) for case_id, pred, gt in pairs]
    summary = summarise(rows)
    if out_dir is not None:
        write_report(rows, summary, Path(out_dir))
    return rows, summary


def _pairs(pred_dir: Path, gt_dir: Path) -> list[tuple[str, Path, Path]]:
    if not gt_dir.is_dir():
        raise InputError(f"ground-truth folder not found: '{gt_dir}'")
    pairs = []
    for gt in sorted(gt_dir.glob("*.nii*")):
        case_id = gt.name.split(".")[0]
        pred = pred_dir / f"{case_id}{PRED_SUFFIX}"
        if not pred.is_file():
            log.warning("no prediction for case %s (expected %s)", case_id, pred)
            continue
        pairs.append((case_id, pred, gt))
    if not pairs:
        raise InputError(f"no prediction in '{pred_dir}' matches a ground truth in '{gt_dir}' (<case>{PRED_SUFFIX})")
    return pairs


def evaluate_case(case_id: str, pred_path: Path, gt_path: Path) -> CaseMetrics:
    pred_img, gt_img = nib.load(str(pred_path)), nib.load(str(gt_path))
    if pred_img.shape != gt_img.shape or not np.allclose(pred_img.affine, gt_img.affine, atol=1e-3):
        raise InputError(
            f"case {case_id}: prediction {pred_path.name} (shape {pred_img.shape}) and ground truth "
            f"{gt_path.name} (shape {gt_img.shape}) are not on the same grid; segment the source scan of this label"
        )
    pred = np.asarray(pred_img.dataobj) > 0
    gt = np.asarray(gt_img.dataobj) > 0
    det = lesion_detection(pred, gt)
    return CaseMetrics(
        case_id=case_id,
        dice=dice(pred, gt),
        lesions_gt=det.lesions_gt,
        lesions_pred=det.lesions_pred,
        lesion_tp=det.tp,
        lesion_fp=det.fp,
        lesion_fn=det.fn,
        voxels_gt=int(gt.sum()),
        voxels_pred=int(pred.sum()),
    )


def summarise(rows: list[CaseMetrics]) -> dict:
    """Mean Dice over cases that contain lesions; lesion counts pooled over all cases."""
    with_lesions = [r.dice for r in rows if r.lesions_gt > 0]
    tp = sum(r.lesion_tp for r in rows)
    fp = sum(r.lesion_fp for r in rows)
    fn = sum(r.lesion_fn for r in rows)
    precision = safe_ratio(tp, tp + fp)
    recall = safe_ratio(tp, tp + fn)
    return {
        "mean_dice": float(np.mean(with_lesions)) if with_lesions else float("nan"),
        "median_dice": float(np.median(with_lesions)) if with_lesions else float("nan"),
        "lesion_recall": recall,
        "lesion_precision": precision,
        "lesion_f1": safe_ratio(2 * precision * recall, precision + recall) if tp else 0.0,
        "lesion_tp": tp,
        "lesion_fp": fp,
        "lesion_fn": fn,
        "n_cases": len(rows),
        "n_cases_with_lesions": len(with_lesions),
        "false_positive_lesions_in_empty_cases": sum(r.lesion_fp for r in rows if r.lesions_gt == 0),
    }


def write_report(rows: list[CaseMetrics], summary: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0]).keys()))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True))
