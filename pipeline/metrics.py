"""The overlap score shared by training validation and evaluation, so ``best.pt`` is chosen by the same
rule the evaluation reports.

Conventions (documented in the README):
* Dice of two empty masks is 1.0 (nothing to find, nothing found); of one empty mask 0.0.
* Any non-zero voxel is foreground; callers select a label with ``mask == label`` first.
"""

from __future__ import annotations

import numpy as np

__all__ = ["case_dice", "dice"]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & truth)) / total


def case_dice(pred: np.ndarray, truth: np.ndarray, labels) -> float:
    """Mean Dice over ``labels`` of two label maps on one grid, every label scored whether present or not.

    A label absent from both maps scores 1.0, one found in only one of them (a false positive on a
    lesion-free case, a missed lesion) 0.0: the conventions of :func:`dice`, and the mean of the ``dice``
    column of evaluation's rows (:func:`pipeline.evaluate.evaluate_arrays`) for those labels. Training
    validation scores each case with it, so false positives on lesion-free cases count against ``best.pt``.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    scores = [dice(pred == label, truth == label) for label in labels]
    if not scores:
        raise ValueError("case_dice: no labels to score; give the foreground labels, e.g. range(1, num_classes)")
    return float(np.mean(scores))
