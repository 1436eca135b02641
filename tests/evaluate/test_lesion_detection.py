"""Lesion-wise detection on known layouts: counts, minimum-overlap IoU, size bins."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluate import lesion_detection
from pipeline.evaluate.lesions import check_size_bins, size_bin_names

SHAPE = (24, 24, 12)


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


def test_known_layout():
    pred, gt = three_lesions_layout()
    det = lesion_detection(pred, gt)
    assert (det.lesions_gt, det.lesions_pred) == (3, 3)
    assert (det.tp, det.fn, det.fp) == (2, 1, 1)
    assert det.precision == pytest.approx(2 / 3)
    assert det.recall == pytest.approx(2 / 3)
    assert det.f1 == pytest.approx(2 / 3)


def test_components_touching_diagonally_are_one_lesion():
    gt = np.zeros(SHAPE, np.uint8)
    gt[2, 2, 2] = gt[3, 3, 3] = 1  # corner contact: 26-connected
    det = lesion_detection(gt, gt)
    assert (det.lesions_gt, det.lesions_pred, det.tp) == (1, 1, 1)


def test_one_prediction_spanning_two_lesions():
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:4, 2:4, 2:4] = 1
    gt[8:10, 2:4, 2:4] = 1
    pred = np.zeros(SHAPE, np.uint8)
    pred[2:10, 2:4, 2:4] = 1
    det = lesion_detection(pred, gt)
    assert (det.lesions_gt, det.lesions_pred, det.tp, det.fn, det.fp) == (2, 1, 2, 0, 0)


def test_empty_cases():
    empty = np.zeros(SHAPE, np.uint8)
    det = lesion_detection(empty, empty)
    assert (det.lesions_gt, det.lesions_pred, det.tp, det.fn, det.fp) == (0, 0, 0, 0, 0)
    assert math.isnan(det.precision) and math.isnan(det.recall) and math.isnan(det.f1)
    pred, gt = three_lesions_layout()
    missed = lesion_detection(empty, gt)
    assert (missed.tp, missed.fn, missed.fp, missed.recall, missed.f1) == (0, 3, 0, 0.0, 0.0)
    assert math.isnan(missed.precision)
    spurious = lesion_detection(pred, empty)
    assert (spurious.fp, spurious.precision, spurious.f1) == (3, 0.0, 0.0)
    assert math.isnan(spurious.recall)


# --- minimum overlap IoU ---------------------------------------------------------------------------


def test_min_overlap_iou_turns_a_grazing_hit_into_a_miss_and_a_false_positive():
    pred, gt = three_lesions_layout()
    det = lesion_detection(pred, gt, min_overlap_iou=0.5)
    # A: IoU 1 (found). B: 1 shared voxel of 48 + 18 − 1: missed, and the grazing component is a false
    # positive.
    assert (det.tp, det.fn, det.fp) == (1, 2, 2)


def test_min_overlap_iou_uses_the_union_of_the_overlapping_components():
    gt = np.zeros(SHAPE, np.uint8)
    gt[4:8, 4:8, 0:8] = 1  # 128 voxels
    pred = np.zeros(SHAPE, np.uint8)
    pred[4:8, 4:8, 0:3] = 1  # 48 voxels
    pred[4:8, 4:8, 5:8] = 1  # 48 voxels: IoU 0.375 each, 96/128 = 0.75 together
    assert lesion_detection(pred, gt, min_overlap_iou=0.75).tp == 1
    det = lesion_detection(pred, gt, min_overlap_iou=0.76)
    assert (det.tp, det.fn, det.fp) == (0, 1, 2)


def test_min_overlap_iou_counts_the_whole_predicted_component():
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:4, 2:4, 2:4] = 1  # 8 voxels, fully covered by a component of 32: IoU 0.25
    pred = np.zeros(SHAPE, np.uint8)
    pred[2:10, 2:4, 2:4] = 1
    assert lesion_detection(pred, gt, min_overlap_iou=0.25).tp == 1
    assert lesion_detection(pred, gt, min_overlap_iou=0.3).tp == 0


def test_min_overlap_iou_out_of_range():
    pred, gt = three_lesions_layout()
    with pytest.raises(ValueError, match="min_overlap_iou"):
        lesion_detection(pred, gt, min_overlap_iou=1.5)


# --- size bins -------------------------------------------------------------------------------------


def test_size_bin_names():
    assert size_bin_names((100, 1000)) == ["lt100", "100to1000", "ge1000"]
    assert size_bin_names((50.5,)) == ["lt50.5", "ge50.5"]
    assert size_bin_names(()) == ["all"]


@pytest.mark.parametrize("edges", [(1000, 100), (100, 100), (-5,), (float("inf"),)])
def test_bad_size_bins(edges):
    with pytest.raises(ValueError, match="positive and increasing"):
        check_size_bins(edges)


def test_lesions_are_binned_by_their_own_volume_in_mm3():
    """Voxels of 2 mm³: lesions of 54, 100 (on the edge: upper bin), 250 and 1200 mm³."""
    gt = np.zeros((40, 40, 12), np.uint8)
    gt[1:4, 1:4, 1:4] = 1  # 27 voxels = 54 mm³ → lt100, found
    gt[10:15, 1:11, 1:2] = 1  # 50 voxels = 100 mm³ → 100to1000, missed
    gt[1:6, 20:25, 1:6] = 1  # 125 voxels = 250 mm³ → 100to1000, found
    gt[20:30, 20:30, 1:7] = 1  # 600 voxels = 1200 mm³ → ge1000, found by a small prediction
    pred = np.zeros_like(gt)
    pred[1:4, 1:4, 1:4] = 1
    pred[1:6, 20:25, 1:6] = 1
    pred[22:25, 22:25, 2:4] = 1  # 18 voxels = 36 mm³ → lt100 predicted component, true positive
    pred[35:37, 35:37, 9:11] = 1  # 8 voxels = 16 mm³ → lt100 false positive
    pred[30:40, 0:10, 8:12] = 1  # 400 voxels = 800 mm³ → 100to1000 false positive
    det = lesion_detection(pred, gt, voxel_volume_mm3=2.0)
    assert det.by_size == {
        "lt100": {"lesions_gt": 1, "lesion_tp": 1, "lesion_fn": 0, "lesions_pred": 3, "lesion_fp": 1},
        "100to1000": {"lesions_gt": 2, "lesion_tp": 1, "lesion_fn": 1, "lesions_pred": 2, "lesion_fp": 1},
        "ge1000": {"lesions_gt": 1, "lesion_tp": 1, "lesion_fn": 0, "lesions_pred": 0, "lesion_fp": 0},
    }
    assert (det.tp, det.fn, det.fp) == (3, 1, 2)
    coarse = lesion_detection(pred, gt, voxel_volume_mm3=2.0, size_bins_mm3=(200,))
    assert coarse.by_size["lt200"]["lesions_gt"] == 2 and coarse.by_size["ge200"]["lesion_tp"] == 2
