"""Dice and lesion-wise detection on known layouts, and evaluating a folder of NIfTI masks."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import InputError
from pipeline.evaluate import CaseMetrics, dice, evaluate_case, evaluate_folder, lesion_detection, summarise
from tests.conftest import make_affine, save_nifti

SHAPE = (24, 24, 12)


def box(*slices) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[slices] = 1
    return mask


# --- dice ------------------------------------------------------------------------------------------


def test_dice_identical_is_one():
    mask = box(slice(2, 8), slice(3, 9), slice(1, 4))
    assert dice(mask, mask) == 1.0


def test_dice_disjoint_is_zero():
    a = box(slice(0, 4), slice(0, 4), slice(0, 4))
    b = box(slice(10, 14), slice(0, 4), slice(0, 4))
    assert dice(a, b) == 0.0


def test_dice_both_empty_is_one():
    assert dice(np.zeros(SHAPE), np.zeros(SHAPE)) == 1.0


@pytest.mark.parametrize("which", ["pred", "truth"])
def test_dice_one_empty_is_zero(which):
    mask = box(slice(2, 5), slice(2, 5), slice(2, 5))
    empty = np.zeros(SHAPE, np.uint8)
    assert (dice(empty, mask) if which == "pred" else dice(mask, empty)) == 0.0


def test_dice_half_overlapping_cubes():
    a = box(slice(0, 4), slice(0, 4), slice(0, 4))  # 64 voxels
    b = box(slice(2, 6), slice(0, 4), slice(0, 4))  # 64 voxels, 32 shared
    assert dice(a, b) == pytest.approx(2 * 32 / 128) == 0.5


def test_dice_known_fraction_of_different_sizes():
    a = box(slice(0, 4), slice(0, 4), slice(0, 4))  # 64 voxels
    b = box(slice(0, 4), slice(0, 4), slice(0, 1))  # 16 voxels, all inside a
    assert dice(a, b) == pytest.approx(2 * 16 / 80)


def test_dice_treats_any_nonzero_as_foreground():
    a = box(slice(0, 4), slice(0, 4), slice(0, 4)) * 2
    b = box(slice(0, 4), slice(0, 4), slice(0, 4)).astype(bool)
    assert dice(a, b) == 1.0


# --- lesion detection ------------------------------------------------------------------------------


def three_lesions_layout():
    """3 GT lesions; the prediction finds 2 of them (one only partly) and adds 1 false positive."""
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:5, 2:5, 2:4] = 1  # lesion A: found exactly
    gt[10:14, 10:14, 5:8] = 1  # lesion B: found by a one-voxel overlap
    gt[18:21, 2:5, 8:10] = 1  # lesion C: missed
    pred = np.zeros(SHAPE, np.uint8)
    pred[2:5, 2:5, 2:4] = 1
    pred[13:16, 13:16, 7:9] = 1  # touches B at (13, 13, 7)
    pred[2:4, 18:21, 9:11] = 1  # false positive
    return pred, gt


def test_lesion_detection_known_layout():
    pred, gt = three_lesions_layout()
    det = lesion_detection(pred, gt)
    assert (det.lesions_gt, det.lesions_pred) == (3, 3)
    assert (det.tp, det.fn, det.fp) == (2, 1, 1)


def test_summary_of_known_layout():
    pred, gt = three_lesions_layout()
    det = lesion_detection(pred, gt)
    row = CaseMetrics("case", dice(pred, gt), det.lesions_gt, det.lesions_pred, det.tp, det.fp, det.fn,
                      int(gt.sum()), int(pred.sum()))
    summary = summarise([row])
    assert (summary["lesion_tp"], summary["lesion_fn"], summary["lesion_fp"]) == (2, 1, 1)
    assert summary["lesion_precision"] == pytest.approx(2 / 3)
    assert summary["lesion_recall"] == pytest.approx(2 / 3)
    assert summary["lesion_f1"] == pytest.approx(2 / 3)
    assert summary["mean_dice"] == pytest.approx(row.dice)
    assert summary["n_cases"] == 1 and summary["n_cases_with_lesions"] == 1


def test_summary_pools_cases():
    rows = [
        CaseMetrics("a", 0.8, 2, 2, 2, 0, 0, 100, 90),
        CaseMetrics("b", 0.4, 2, 3, 1, 2, 1, 50, 70),
        CaseMetrics("empty", 0.0, 0, 1, 0, 1, 0, 0, 5),
    ]
    summary = summarise(rows)
    assert summary["mean_dice"] == pytest.approx(0.6)  # cases without lesions are left out
    assert summary["median_dice"] == pytest.approx(0.6)
    assert summary["lesion_recall"] == pytest.approx(3 / 4)
    assert summary["lesion_precision"] == pytest.approx(3 / 6)
    assert summary["false_positive_lesions_in_empty_cases"] == 1
    assert summary["n_cases"] == 3 and summary["n_cases_with_lesions"] == 2


def test_summary_without_lesions_is_nan_not_an_error():
    summary = summarise([CaseMetrics("empty", 1.0, 0, 0, 0, 0, 0, 0, 0)])
    assert math.isnan(summary["mean_dice"]) and math.isnan(summary["lesion_recall"])
    assert math.isnan(summary["lesion_precision"]) and summary["lesion_f1"] == 0.0


def test_diagonal_neighbours_are_one_lesion():
    gt = np.zeros(SHAPE, np.uint8)
    gt[5, 5, 5] = gt[6, 6, 6] = gt[7, 7, 7] = 1  # corner-touching only: 26-connected
    pred = np.zeros(SHAPE, np.uint8)
    pred[7, 7, 7] = 1
    det = lesion_detection(pred, gt)
    assert (det.lesions_gt, det.tp, det.fn, det.fp) == (1, 1, 0, 0)


def test_voxels_two_apart_are_two_lesions():
    gt = np.zeros(SHAPE, np.uint8)
    gt[5, 5, 5] = gt[7, 5, 5] = 1
    det = lesion_detection(np.zeros(SHAPE, np.uint8), gt)
    assert (det.lesions_gt, det.tp, det.fn) == (2, 0, 2)


def test_one_prediction_spanning_two_lesions():
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:4, 2:4, 2:4] = 1
    gt[8:10, 2:4, 2:4] = 1
    pred = np.zeros(SHAPE, np.uint8)
    pred[2:10, 2:4, 2:4] = 1
    det = lesion_detection(pred, gt)
    assert (det.lesions_gt, det.lesions_pred, det.tp, det.fn, det.fp) == (2, 1, 2, 0, 0)


# --- evaluate_folder -------------------------------------------------------------------------------


def write_pair(tmp_path, case, pred, gt, pred_affine=None, gt_affine=None):
    affine = make_affine("LPS")
    save_nifti(pred, affine if pred_affine is None else pred_affine, tmp_path / "pred" / f"{case}_seg.nii.gz")
    save_nifti(gt, affine if gt_affine is None else gt_affine, tmp_path / "gt" / f"{case}.nii.gz")


def test_evaluate_folder_writes_report(tmp_path):
    pred, gt = three_lesions_layout()
    write_pair(tmp_path, "case_a", pred, gt)
    write_pair(tmp_path, "case_b", gt, gt)
    save_nifti(gt, make_affine("LPS"), tmp_path / "gt" / "case_c.nii.gz")  # no prediction: skipped

    rows, summary = evaluate_folder(tmp_path / "pred", tmp_path / "gt", tmp_path / "report")

    assert [r.case_id for r in rows] == ["case_a", "case_b"]
    assert rows[1].dice == 1.0 and (rows[1].lesion_tp, rows[1].lesion_fp, rows[1].lesion_fn) == (3, 0, 0)
    assert rows[0].voxels_gt == int(gt.sum()) and rows[0].voxels_pred == int(pred.sum())

    with open(tmp_path / "report" / "metrics.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0].keys()) == [
        "case_id", "dice", "lesions_gt", "lesions_pred", "lesion_tp", "lesion_fp", "lesion_fn", "voxels_gt",
        "voxels_pred",
    ]
    assert [t["case_id"] for t in table] == ["case_a", "case_b"]
    assert float(table[0]["dice"]) == pytest.approx(rows[0].dice)
    assert table[0]["lesion_fp"] == "1"

    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert {"mean_dice", "lesion_recall", "lesion_precision", "n_cases"} <= saved.keys()
    assert saved["n_cases"] == 2
    assert saved["lesion_recall"] == pytest.approx(5 / 6)
    assert saved["lesion_precision"] == pytest.approx(5 / 6)
    assert saved["mean_dice"] == pytest.approx((rows[0].dice + 1.0) / 2)
    assert saved == pytest.approx(summary, nan_ok=True)


def test_evaluate_case_counts_labels_above_zero(tmp_path):
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:6, 2:6, 2:6] = 2
    write_pair(tmp_path, "c", gt, gt)
    row = evaluate_case("c", tmp_path / "pred" / "c_seg.nii.gz", tmp_path / "gt" / "c.nii.gz")
    assert row.dice == 1.0 and row.voxels_gt == 64 and row.lesions_gt == 1


@pytest.mark.parametrize("mismatch", ["shape", "affine"])
def test_grid_mismatch_names_the_case(tmp_path, mismatch):
    _, gt = three_lesions_layout()
    if mismatch == "shape":
        write_pair(tmp_path, "liver_3", gt[:, :, :10], gt)
    else:
        write_pair(tmp_path, "liver_3", gt, gt, pred_affine=make_affine("RAS"))
    with pytest.raises(InputError) as info:
        evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    message = str(info.value)
    assert "liver_3" in message and "not on the same grid" in message
    if mismatch == "shape":
        assert "(24, 24, 10)" in message and "(24, 24, 12)" in message


def test_missing_ground_truth_folder(tmp_path):
    with pytest.raises(InputError, match="ground-truth folder not found"):
        evaluate_folder(tmp_path / "pred", tmp_path / "nothing")


def test_no_matching_prediction(tmp_path):
    save_nifti(np.zeros(SHAPE, np.uint8), make_affine("RAS"), tmp_path / "gt" / "a.nii.gz")
    (tmp_path / "pred").mkdir()
    with pytest.raises(InputError) as info:
        evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    assert "_seg.nii.gz" in str(info.value) and str(tmp_path / "pred") in str(info.value)


def test_report_folder_is_not_needed(tmp_path):
    _, gt = three_lesions_layout()
    write_pair(tmp_path, "x", gt, gt)
    rows, summary = evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    assert len(rows) == 1 and summary["mean_dice"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "pred"]
    assert nib.load(str(tmp_path / "gt" / "x.nii.gz")).shape == SHAPE
