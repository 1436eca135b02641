"""Dice, IoU and volume on known layouts, and Dice/IoU against SimpleITK on random blobs."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate import dice, iou
from pipeline.evaluate.metrics import case_dice, safe_ratio, volume_ml
from tests.evaluate.blobs import random_blob

SHAPE = (24, 24, 12)


def box(*slices) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[slices] = 1
    return mask


def test_dice_identical_is_one():
    mask = box(slice(2, 8), slice(3, 9), slice(1, 4))
    assert dice(mask, mask) == 1.0 and iou(mask, mask) == 1.0


def test_dice_disjoint_is_zero():
    a = box(slice(0, 4), slice(0, 4), slice(0, 4))
    b = box(slice(10, 14), slice(0, 4), slice(0, 4))
    assert dice(a, b) == 0.0 and iou(a, b) == 0.0


def test_both_empty_is_one():
    assert dice(np.zeros(SHAPE), np.zeros(SHAPE)) == 1.0
    assert iou(np.zeros(SHAPE), np.zeros(SHAPE)) == 1.0


@pytest.mark.parametrize("which", ["pred", "truth"])
def test_one_empty_is_zero(which):
    mask = box(slice(2, 5), slice(2, 5), slice(2, 5))
    empty = np.zeros(SHAPE, np.uint8)
    pair = (empty, mask) if which == "pred" else (mask, empty)
    assert dice(*pair) == 0.0 and iou(*pair) == 0.0


def test_half_overlapping_cubes():
    a = box(slice(0, 4), slice(0, 4), slice(0, 4))  # 64 voxels
    b = box(slice(2, 6), slice(0, 4), slice(0, 4))  # 64 voxels, 32 shared
    assert dice(a, b) == pytest.approx(2 * 32 / 128) == 0.5
    assert iou(a, b) == pytest.approx(32 / 96)


def test_known_fraction_of_different_sizes():
    a = box(slice(0, 4), slice(0, 4), slice(0, 4))  # 64 voxels
    b = box(slice(0, 4), slice(0, 4), slice(0, 1))  # 16 voxels, all inside a
    assert dice(a, b) == pytest.approx(2 * 16 / 80)
    assert iou(a, b) == pytest.approx(16 / 64)


def test_any_nonzero_is_foreground():
    a = box(slice(0, 4), slice(0, 4), slice(0, 4)) * 2
    b = box(slice(0, 4), slice(0, 4), slice(0, 4)).astype(bool)
    assert dice(a, b) == 1.0


def test_volume_in_millilitres():
    mask = box(slice(0, 10), slice(0, 10), slice(0, 5))  # 500 voxels
    assert volume_ml(mask, (0.8, 0.9, 2.5)) == pytest.approx(500 * 1.8 / 1000)


def test_safe_ratio():
    assert safe_ratio(1, 4) == 0.25
    assert np.isnan(safe_ratio(0, 0))


@pytest.mark.parametrize("seed", range(4))
def test_dice_and_iou_match_simpleitk(seed):
    import SimpleITK as sitk

    pred, truth = random_blob(seed=seed), random_blob(seed=seed + 50)
    measures = sitk.LabelOverlapMeasuresImageFilter()
    measures.Execute(sitk.GetImageFromArray(truth.astype(np.uint8)),
                     sitk.GetImageFromArray(pred.astype(np.uint8)))
    assert dice(pred, truth) == pytest.approx(measures.GetDiceCoefficient(), abs=1e-6)
    assert iou(pred, truth) == pytest.approx(measures.GetJaccardCoefficient(), abs=1e-6)


def test_case_dice_scores_every_label_with_the_empty_conventions():
    truth = box(slice(2, 8), slice(3, 9), slice(1, 4))  # label 1 only
    pred = truth.copy()
    assert case_dice(pred, truth, [1, 2]) == 1.0  # label 2 absent from both: 1
    pred[15:18, 15:18, 5:7] = 2  # a false positive of label 2: 0
    assert case_dice(pred, truth, [1, 2]) == pytest.approx(0.5)
    assert case_dice(np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8), [1]) == 1.0
    with pytest.raises(ValueError, match="no labels"):
        case_dice(pred, truth, [])
