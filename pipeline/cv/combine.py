"""Choosing post-processing rules in combination, as nnU-Net does: each rule on top of those kept so far.

The rules are tried in :data:`ORDER`, the order :func:`pipeline.postprocess.rules.apply_postprocessing`
applies them, from the mildest to the most aggressive:

1. ``restrict_to_body``, class by class (in label order), where the rule is offered (every ground-truth
   voxel of the class inside the body);
2. ``min_component_mm3``, every threshold tried on top of the rules kept, for all classes at once: of the
   thresholds that improve, the best (the smallest of equals);
3. ``keep_largest``, class by class.

Each is kept only where it improves on the rules kept before it (:func:`better`: Dice up and lesion-wise
F1 not down, or F1 up and Dice not down; the class's figures for a per-class rule, the means over classes
for the minimum size). The final combination is then checked as a whole against the baseline and against
the best single rule (each rule tried alone, :mod:`pipeline.cv.select`): where that rule alone is better
than the combination, it replaces it.

What this procedure cannot find: two rules of which neither improves alone (on the rules kept before it)
but which improve together. Each rule is judged once, in order, on what is kept so far; the whole-set
check compares only the combination and the single rules (tests/cv/test_combine.py builds such a case).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

TOLERANCE = 1e-9  # a change smaller than this is no change
ORDER = ("restrict_to_body", "min_component_mm3", "keep_largest")


@dataclass(frozen=True)
class Rules:
    """A set of post-processing rules (class names per rule; the minimum size in mm³, 0 for none)."""

    restrict_to_body: tuple[str, ...] = ()
    min_component_mm3: float = 0.0
    keep_largest: tuple[str, ...] = ()

    def with_class(self, rule: str, name: str) -> Rules:
        return replace(self, **{rule: tuple(getattr(self, rule)) + (name,)})

    def as_chosen(self) -> dict:
        """The form of ``postprocessing.json``'s ``chosen`` (and of :func:`pipeline.cv.select.chosen_config`)."""
        return {"keep_largest": list(self.keep_largest), "restrict_to_body": list(self.restrict_to_body),
                "min_component_mm3": float(self.min_component_mm3)}

    @property
    def empty(self) -> bool:
        return not (self.restrict_to_body or self.keep_largest or self.min_component_mm3 > 0)


Scorer = Callable[[Rules], dict]  # rules -> {class name: {"dice": ..., "lesion_f1": ...}}


@dataclass
class Combination:
    """The outcome: the rules chosen and every step tried, with its figures."""

    rules: Rules
    steps: list[dict] = field(default_factory=list)
    verdict: dict = field(default_factory=dict)

    def report(self) -> dict:
        return {"order": list(ORDER), "steps": self.steps, **self.verdict}


def combine(score: Scorer, classes: list[str], offered_body: list[str], thresholds: list[float],
            singles: list[tuple[Rules, dict]]) -> Combination:
    """The sequential choice, then the whole-set check; ``score`` gives the per-class figures of a rule set,
    ``singles`` the single rules that improve alone, each with its entry of ``tried``."""
    rules, steps = Rules(), []
    current = score(rules)
    for name in offered_body:
        rules, current = _per_class_step("restrict_to_body", name, rules, current, score, steps)
    rules, current = _min_size_step(thresholds, rules, current, score, steps)
    for name in classes:
        rules, current = _per_class_step("keep_largest", name, rules, current, score, steps)
    return _verify(rules, score, singles, steps)


def better(before: dict, after: dict) -> bool:
    """Dice up and F1 not down, or F1 up and Dice not down."""
    d_dice, d_f1 = after["dice"] - before["dice"], after["lesion_f1"] - before["lesion_f1"]
    return bool((d_dice > TOLERANCE and d_f1 >= -TOLERANCE) or (d_f1 > TOLERANCE and d_dice >= -TOLERANCE))


def mean_scores(per_class: dict) -> dict:
    scores = list(per_class.values())
    if not scores:
        return {"dice": float("nan"), "lesion_f1": float("nan")}
    return {"dice": sum(s["dice"] for s in scores) / len(scores),
            "lesion_f1": sum(s["lesion_f1"] for s in scores) / len(scores)}


def figures(before: dict, after: dict) -> dict:
    return {"dice_before": before["dice"], "dice_after": after["dice"],
            "f1_before": before["lesion_f1"], "f1_after": after["lesion_f1"]}


# --- the steps -----------------------------------------------------------------------------------


def _per_class_step(rule: str, name: str, rules: Rules, current: dict, score: Scorer, steps: list):
    trial = rules.with_class(rule, name)
    after = score(trial)
    keep = better(current[name], after[name])
    steps.append({"rule": rule, "class": name, "on_top_of": rules.as_chosen(),
                  **figures(current[name], after[name]), "kept": keep})
    return (trial, after) if keep else (rules, current)


def _min_size_step(thresholds: list[float], rules: Rules, current: dict, score: Scorer, steps: list):
    before = mean_scores(current)
    best: Optional[tuple] = None
    for threshold in thresholds:
        trial = replace(rules, min_component_mm3=float(threshold))
        after = score(trial)
        whole = mean_scores(after)
        steps.append({"rule": "min_component_mm3", "class": "all", "value": float(threshold),
                      "on_top_of": rules.as_chosen(), **figures(before, whole), "kept": False})
        if better(before, whole) and (best is None or (whole["dice"], whole["lesion_f1"]) > best[0]):
            best = ((whole["dice"], whole["lesion_f1"]), len(steps) - 1, trial, after)
    if best is None:
        return rules, current
    steps[best[1]]["kept"] = True
    return best[2], best[3]


def _verify(rules: Rules, score: Scorer, singles: list[tuple[Rules, dict]], steps: list) -> Combination:
    baseline = mean_scores(score(Rules()))
    combined = mean_scores(score(rules))
    verdict = {"baseline": baseline, "combined": {"rules": rules.as_chosen(), **combined}}
    best_single = None
    for single, entry in singles:
        whole = mean_scores(score(single))
        if best_single is None or (whole["dice"], whole["lesion_f1"]) > (best_single[1]["dice"],
                                                                          best_single[1]["lesion_f1"]):
            best_single = (single, whole, entry)
    if best_single is not None:
        single, whole, entry = best_single
        verdict["best_single"] = {"rule": entry["rule"], "class": entry["class"], **(
            {"value": entry["value"]} if "value" in entry else {}), "rules": single.as_chosen(), **whole}
    outcome = "combination"
    if not rules.empty and not better(baseline, combined):
        outcome, rules, combined = "none: the combination does not improve on the baseline as a whole", Rules(), baseline
    if best_single is not None and best_single[0] != rules and better(combined, best_single[1]):
        outcome, rules = "best single rule: it alone is better than the combination as a whole", best_single[0]
    elif rules.empty and outcome == "combination":
        outcome = "none: no rule improves"
    verdict["outcome"] = outcome
    verdict["final"] = {"rules": rules.as_chosen(), **mean_scores(score(rules))}
    return Combination(rules, steps, verdict)
