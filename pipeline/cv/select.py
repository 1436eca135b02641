"""Choosing post-processing from out-of-fold predictions, as nnU-Net does after cross-validation.

Each rule of :mod:`pipeline.postprocess.rules` is first tried on its own against the raw predictions:

* ``keep_largest``, per class;
* ``restrict_to_body``, per class, offered only where every ground-truth voxel of that class lies
  inside the body mask (otherwise it would be known to cut true lesions);
* ``inference.min_component_mm3``, for every class at once, at a few thresholds taken from the smallest
  true lesion (:data:`MIN_SIZE_FRACTIONS` of its volume).

A rule improves where the out-of-fold mean Dice improves and the lesion-wise F1 does not drop, or the F1
improves and the Dice does not drop (per class for the per-class rules; the means over classes for the
minimum size). The rules chosen are then found in combination (:mod:`pipeline.cv.combine`): each rule on
top of those kept so far, in a fixed order, and the final set checked as a whole against the baseline and
the best single rule. Dice is the mean over cases (1 where a class is in neither mask, as in evaluation);
F1 is pooled over cases from the lesion-wise detection counts
(:func:`pipeline.evaluate.lesions.lesion_detection`), 1 where there is nothing to find and nothing found.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from pipeline.config import Config
from pipeline.cv.combine import Rules, better, combine, figures, mean_scores
from pipeline.postprocess.components import label_components
from pipeline.postprocess.rules import body_mask

log = logging.getLogger(__name__)

MIN_SIZE_FRACTIONS = (0.1, 0.25, 0.5, 1.0)  # of the smallest true lesion's volume: the thresholds tried


@dataclass
class OOFCase:
    """One out-of-fold prediction: its mask, the ground truth and the scan it was predicted from."""

    case_id: str
    prediction: Path
    truth: Path
    image: Any  # the scan source (a path or the Channels of a case), for the body mask


@dataclass
class _Tally:
    """Per class: the sum of case Dice scores and pooled lesion counts."""

    dice: float = 0.0
    cases: int = 0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, score: tuple[float, int, int, int]) -> None:
        """One case's :meth:`ClassComponents.score`."""
        self.dice += score[0]
        self.cases += 1
        self.tp, self.fp, self.fn = self.tp + score[1], self.fp + score[2], self.fn + score[3]

    @property
    def mean_dice(self) -> float:
        return self.dice / self.cases if self.cases else float("nan")

    @property
    def f1(self) -> float:
        den = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / den if den else 1.0


@dataclass
class _Evidence:
    """Every case's predicted components per class (labelled once), from which any set of rules is scored."""

    classes: dict[str, int]
    parts: dict[int, list[tuple[ClassComponents, float]]] = field(default_factory=dict)  # value -> (parts, mm³)
    outside_voxels: dict[int, int] = field(default_factory=dict)  # ground truth outside the body, per class

    def scores(self, rules: Rules) -> dict:
        """``{class name: {"dice", "lesion_f1"}}`` with ``rules`` applied, in the order
        :func:`~pipeline.postprocess.rules.apply_postprocessing` applies them."""
        out = {}
        for name, value in self.classes.items():
            tally = _Tally()
            for parts, voxel_mm3 in self.parts.get(value, []):
                keep = parts.all()
                if name in rules.restrict_to_body:
                    keep &= parts.in_body()
                if rules.min_component_mm3 > 0:
                    keep &= parts.at_least(rules.min_component_mm3 / voxel_mm3)
                if name in rules.keep_largest:
                    keep = parts.largest(keep)
                tally.add(parts.score(keep))
            out[name] = {"dice": tally.mean_dice, "lesion_f1": tally.f1}
        return out

    @property
    def cases(self) -> int:
        return max((len(v) for v in self.parts.values()), default=0)


def select_postprocessing(cases: Sequence[OOFCase], config: Config,
                          thresholds_mm3: Optional[Sequence[float]] = None) -> dict:
    """The rules worth applying, with before/after Dice and F1 of every rule tried (the content of
    ``postprocessing.json``): ``{"chosen": {"keep_largest", "restrict_to_body", "min_component_mm3"},
    "tried": [...], "baseline": {...}, "thresholds_mm3": [...]}``."""
    classes = {name: value for name, value in config.data.labels.items() if value != 0}
    if thresholds_mm3 is None:
        thresholds_mm3 = min_size_candidates(cases, list(classes.values()))
    evidence = _Evidence(classes)
    for case in cases:
        _add_case(case, config, evidence)
    return _decide(evidence, list(thresholds_mm3))


def min_size_candidates(cases: Sequence[OOFCase], values: Sequence[int]) -> list[float]:
    """Thresholds (mm³) from the smallest true lesion of any class: :data:`MIN_SIZE_FRACTIONS` of its volume."""
    from pipeline.evaluate.folder import read_pair

    smallest = np.inf
    for case in cases:
        _, truth, spacing = read_pair(case.prediction, case.truth)
        voxel_mm3 = float(np.prod(spacing))
        for value in values:
            components, count = label_components(truth == value)
            if count:
                sizes = np.bincount(components.ravel())[1:]
                smallest = min(smallest, float(sizes.min()) * voxel_mm3)
    if not np.isfinite(smallest):
        return []
    return sorted({round(f * smallest, 3) for f in MIN_SIZE_FRACTIONS if f * smallest > 0})


def chosen_config(config: Config, chosen: dict) -> Config:
    """``config`` with the rules of ``chosen`` (``select_postprocessing(...)["chosen"]``) in place of its own."""
    postprocess = dataclasses.replace(config.postprocess, keep_largest=list(chosen["keep_largest"]),
                                      restrict_to_body=list(chosen["restrict_to_body"]))
    inference = dataclasses.replace(config.inference, min_component_mm3=float(chosen["min_component_mm3"]))
    return dataclasses.replace(config, postprocess=postprocess, inference=inference)


def without_postprocessing(config: Config) -> Config:
    """``config`` with every post-processing rule off (the raw predictions the choice starts from)."""
    return chosen_config(config, {"keep_largest": [], "restrict_to_body": [], "min_component_mm3": 0.0})


# --- the trials ----------------------------------------------------------------------------------


def _add_case(case: OOFCase, config: Config, evidence: _Evidence) -> None:
    from pipeline.evaluate.folder import read_pair

    pred, truth, spacing = read_pair(case.prediction, case.truth)
    voxel_mm3 = float(np.prod(spacing))
    body = body_mask(first_channel(case.image), config)
    if body.shape != truth.shape:
        raise ValueError(f"case {case.case_id}: the scan's grid {body.shape} differs from its label's {truth.shape}")
    for value in evidence.classes.values():
        truth_v = truth == value
        evidence.outside_voxels[value] = (evidence.outside_voxels.get(value, 0)
                                          + int(np.count_nonzero(truth_v & ~body)))
        evidence.parts.setdefault(value, []).append((ClassComponents.of(pred == value, truth_v, body), voxel_mm3))
    log.debug("post-processing trials: case %s done", case.case_id)


@dataclass
class ClassComponents:
    """One class of one case as its predicted components and how they meet the truth and the body.

    Every rule keeps a subset of the predicted components (the 26-connected components of the class,
    which removing others does not change), so each rule's Dice and lesion counts follow from per
    component counts, with the components labelled once instead of once per rule tried. The counts are
    those of :func:`~pipeline.evaluate.lesions.lesion_detection` at its default (any overlap detects):
    a true lesion is detected when a kept component overlaps it; a kept component overlapping no true
    lesion is a false positive.
    """

    sizes: np.ndarray  # voxels of each predicted component (index 0: background, unused)
    inside: np.ndarray  # of them, voxels in the body
    overlap: np.ndarray  # of them, voxels in the truth
    pair_gt: np.ndarray  # every overlapping (true lesion, predicted component) pair: the lesion...
    pair_pred: np.ndarray  # ...and the component
    n_gt: int
    truth_voxels: int

    @classmethod
    def of(cls, pred: np.ndarray, truth: np.ndarray, body: np.ndarray) -> ClassComponents:
        from pipeline.evaluate.surface import union_bbox

        box = union_bbox(pred, truth, margin=1)
        if box is not None:
            pred, truth, body = pred[box], truth[box], body[box]
        pred_labels, n_pred = label_components(pred)
        gt_labels, n_gt = label_components(truth)
        flat = pred_labels.ravel()
        sizes = np.bincount(flat, minlength=n_pred + 1)
        inside = np.bincount(flat, weights=body.ravel(), minlength=n_pred + 1)
        overlap = np.bincount(flat, weights=np.asarray(truth, bool).ravel(), minlength=n_pred + 1)
        both = (gt_labels > 0) & (pred_labels > 0)
        codes = np.unique(gt_labels[both].astype(np.int64) * (n_pred + 1) + pred_labels[both])
        return cls(sizes, inside, overlap, codes // (n_pred + 1), codes % (n_pred + 1), int(n_gt),
                   int(np.count_nonzero(truth)))

    def all(self) -> np.ndarray:
        keep = np.ones(self.sizes.size, bool)
        keep[0] = False
        return keep

    def largest(self, among: Optional[np.ndarray] = None) -> np.ndarray:
        """:func:`~pipeline.postprocess.rules.keep_largest_component` (ties: the first in scan order), of the
        components ``among`` selects (those earlier rules kept; all by default)."""
        among = self.all() if among is None else among
        keep = np.zeros(self.sizes.size, bool)
        if among.any():
            keep[int(np.argmax(np.where(among, self.sizes, -1)))] = True
        return keep

    def in_body(self) -> np.ndarray:
        """:func:`~pipeline.postprocess.rules.remove_outside`: at least half of the voxels in the body."""
        return self.all() & (self.inside * 2 >= self.sizes)

    def at_least(self, min_voxels: float) -> np.ndarray:
        """:func:`~pipeline.postprocess.components.remove_small_components`."""
        return self.all() & (self.sizes >= min_voxels)

    def score(self, keep: np.ndarray) -> tuple[float, int, int, int]:
        """(Dice, lesion TP, FP, FN) with only the components ``keep`` selects."""
        predicted = int(self.sizes[keep].sum())
        total = predicted + self.truth_voxels
        dice = 1.0 if total == 0 else 2.0 * float(self.overlap[keep].sum()) / total
        kept_pairs = keep[self.pair_pred]
        tp = int(np.unique(self.pair_gt[kept_pairs]).size)
        touching = np.zeros(self.sizes.size, bool)
        touching[self.pair_pred] = True
        fp = int(np.count_nonzero(keep & ~touching))
        return dice, tp, fp, self.n_gt - tp


def first_channel(source) -> np.ndarray:
    """A scan source's first channel as read, ``[i, j, k]`` (the grid of its label)."""
    from pipeline.io.read_scan import read_scan

    array = np.asarray(read_scan(source).array)
    return array[..., 0] if array.ndim == 4 else array


def _decide(evidence: _Evidence, thresholds: list[float]) -> dict:
    """The single-rule trials (``tried``), then the combination (``combination``) that gives ``chosen``."""
    classes = evidence.classes
    if not evidence.cases:
        return {"chosen": Rules().as_chosen(), "baseline": {}, "thresholds_mm3": thresholds, "tried": [],
                "combination": {}, "cases": 0}
    baseline = evidence.scores(Rules())
    tried: list[dict] = []
    singles: list[tuple[Rules, dict]] = []
    offered_body = []
    for rule in ("keep_largest", "restrict_to_body"):
        for name, value in classes.items():
            entry = {"rule": rule, "class": name}
            outside = evidence.outside_voxels.get(value, 0)
            if rule == "restrict_to_body" and outside:
                entry.update(offered=False, reason=f"{outside} ground-truth voxel(s) of {name} lie outside the body")
                tried.append(entry)
                continue
            if rule == "restrict_to_body":
                offered_body.append(name)
            single = Rules().with_class(rule, name)
            after = evidence.scores(single)[name]
            entry.update(figures(baseline[name], after), offered=True, improves_alone=better(baseline[name], after))
            tried.append(entry)
            if entry["improves_alone"]:
                singles.append((single, entry))
    before_all = mean_scores(baseline)
    for threshold in thresholds:
        single = Rules(min_component_mm3=float(threshold))
        after_all = mean_scores(evidence.scores(single))
        entry = {"rule": "min_component_mm3", "class": "all", "value": threshold,
                 **figures(before_all, after_all), "offered": True, "improves_alone": better(before_all, after_all)}
        tried.append(entry)
        if entry["improves_alone"]:
            singles.append((single, entry))
    if not thresholds:
        tried.append({"rule": "min_component_mm3", "class": "all", "offered": False,
                      "reason": "no ground-truth lesion to size the thresholds from"})
    combination = combine(evidence.scores, list(classes), offered_body, thresholds, singles)
    chosen = combination.rules.as_chosen()
    for entry in tried:
        if entry["offered"]:
            entry["chosen"] = (entry.get("value") == chosen["min_component_mm3"] if entry["rule"] == "min_component_mm3"
                               else entry["class"] in chosen[entry["rule"]])
    return {"chosen": chosen, "baseline": baseline, "thresholds_mm3": thresholds, "tried": tried,
            "combination": combination.report(), "cases": evidence.cases}
