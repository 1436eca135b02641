"""Choosing post-processing from constructed out-of-fold predictions whose answer is known: rules that
help are kept, rules that hurt are dropped, restrict-to-body is only offered where the truth lies inside."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.cv.select import OOFCase, chosen_config, select_postprocessing, without_postprocessing
from pipeline.postprocess.rules import apply_postprocessing
from tests.conftest import make_affine, save_nifti

SHAPE = (24, 24, 12)
CONFIG = ["data.labels={background: 0, oedema: 1, core: 2}", "preprocess.intensity.window=[-150, 250]"]


def _case(tmp_path, n: int, truth_outside_body: bool = False) -> OOFCase:
    """Oedema: one 6x6x5 lesion, predicted with two 8-voxel false positives (one in the body, one in the
    air); core: two 27-voxel lesions, predicted exactly. Voxels 1 x 1 x 2 mm (2 mm³)."""
    affine = make_affine("LPS", spacing=(1.0, 1.0, 2.0))
    image = np.full(SHAPE, -1000.0, np.float32)
    image[4:20, 4:20, 2:10] = 40.0
    truth = np.zeros(SHAPE, np.uint8)
    truth[6:12, 6:12, 3:8] = 1
    truth[6:9, 15:18, 3:6] = 2
    truth[15:18, 6:9, 3:6] = 2
    pred = truth.copy()
    pred[14:16, 14:16, 4:6] = 1  # false positive inside the body
    pred[0:2, 0:2, 0:2] = 1  # false positive in the air
    if truth_outside_body:
        truth[1:3, 20:22, 0:2] = 1
    paths = [save_nifti(a, affine, tmp_path / f"{kind}_{n}.nii.gz") for kind, a in
             (("image", image), ("truth", truth), ("pred", pred))]
    return OOFCase(f"case_{n}", prediction=paths[2], truth=paths[1], image=str(paths[0]))


def _tried(report, rule, name, value=None):
    return next(t for t in report["tried"] if t["rule"] == rule and t["class"] == name
                and (value is None or t.get("value") == value))


def test_rules_that_help_are_kept_and_rules_that_hurt_are_dropped(tmp_path):
    cases = [_case(tmp_path, n) for n in range(3)]
    report = select_postprocessing(cases, load_config(None, CONFIG))

    # Oedema: Dice 2*180/(180+196) before (180 true voxels, 16 false) -> 1 after keeping the largest.
    largest = _tried(report, "keep_largest", "oedema")
    assert largest["dice_before"] == pytest.approx(2 * 180 / (180 + 196))
    assert largest["dice_after"] == pytest.approx(1.0)
    assert largest["f1_before"] == pytest.approx(6 / (6 + 6)) and largest["f1_after"] == pytest.approx(1.0)
    assert largest["improves_alone"]
    # Core: keeping the largest of two true lesions halves the detections and lowers Dice: dropped.
    core = _tried(report, "keep_largest", "core")
    assert core["dice_after"] == pytest.approx(2 * 27 / (27 + 54)) and core["f1_after"] == pytest.approx(2 / 3)
    assert not core["improves_alone"]
    # Restrict to body: removes the air false positive of oedema (kept); changes nothing for core (not kept).
    body = _tried(report, "restrict_to_body", "oedema")
    assert body["offered"] and body["improves_alone"] and body["chosen"]
    assert body["dice_after"] == pytest.approx(2 * 180 / (180 + 188))
    assert body["f1_after"] == pytest.approx(6 / 9)
    assert not _tried(report, "restrict_to_body", "core")["improves_alone"]
    # Minimum size from the smallest true lesion (27 voxels, 54 mm³): 16 mm³ false positives go at 27 and
    # 54 mm³ (the smaller is chosen), not at 5.4 or 13.5 mm³; the 27-voxel true lesions stay at 54 mm³.
    assert report["thresholds_mm3"] == [5.4, 13.5, 27.0, 54.0]
    assert not _tried(report, "min_component_mm3", "all", 13.5)["improves_alone"]
    assert _tried(report, "min_component_mm3", "all", 27.0)["improves_alone"]
    assert _tried(report, "min_component_mm3", "all", 27.0)["chosen"]
    # In combination: restrict-to-body (oedema), then 27 mm³ on top of it, leave one oedema component, so
    # keep-largest on top of them changes nothing and is not kept (though it improves alone).
    assert report["chosen"] == {"keep_largest": [], "restrict_to_body": ["oedema"], "min_component_mm3": 27.0}
    assert not largest["chosen"]
    steps = report["combination"]["steps"]
    assert [(s["rule"], s["class"], s.get("value"), s["kept"]) for s in steps] == [
        ("restrict_to_body", "oedema", None, True), ("restrict_to_body", "core", None, False),
        ("min_component_mm3", "all", 5.4, False), ("min_component_mm3", "all", 13.5, False),
        ("min_component_mm3", "all", 27.0, True), ("min_component_mm3", "all", 54.0, False),
        ("keep_largest", "oedema", None, False), ("keep_largest", "core", None, False)]
    assert steps[6]["on_top_of"] == {"keep_largest": [], "restrict_to_body": ["oedema"], "min_component_mm3": 27.0}
    assert steps[6]["dice_before"] == pytest.approx(1.0) and steps[6]["dice_after"] == pytest.approx(1.0)
    assert report["combination"]["outcome"] == "combination"
    assert report["combination"]["final"]["dice"] == pytest.approx(1.0)


def test_restrict_to_body_is_not_offered_where_the_truth_leaves_the_body(tmp_path):
    cases = [_case(tmp_path, 0), _case(tmp_path, 1, truth_outside_body=True)]
    report = select_postprocessing(cases, load_config(None, CONFIG), thresholds_mm3=[])
    entry = _tried(report, "restrict_to_body", "oedema")
    assert entry == {"rule": "restrict_to_body", "class": "oedema", "offered": False,
                     "reason": "8 ground-truth voxel(s) of oedema lie outside the body"}
    assert "oedema" not in report["chosen"]["restrict_to_body"]


def test_the_chosen_rules_applied_give_the_truth_back(tmp_path):
    import nibabel as nib

    case = _case(tmp_path, 0)
    config = load_config(None, CONFIG)
    report = select_postprocessing([case], config)
    chosen = chosen_config(config, report["chosen"])
    assert chosen.postprocess.restrict_to_body == ["oedema"] and chosen.inference.min_component_mm3 == 27.0
    pred = nib.load(str(case.prediction))
    image = np.asarray(nib.load(str(case.image)).dataobj)
    out = apply_postprocessing(np.asarray(pred.dataobj), pred.affine, image, chosen)
    assert np.array_equal(out, np.asarray(nib.load(str(case.truth)).dataobj))
    off = without_postprocessing(chosen)
    assert off.postprocess.restrict_to_body == [] and off.inference.min_component_mm3 == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_component_scores_equal_evaluating_the_applied_rule(seed):
    """The per-component shortcut gives the Dice and lesion counts of evaluating each rule's output."""
    from pipeline.cv.select import ClassComponents
    from pipeline.evaluate import evaluate_masks
    from pipeline.postprocess.components import remove_small_components
    from pipeline.postprocess.rules import keep_largest_component, remove_outside

    rng = np.random.default_rng(seed)
    pred = (rng.random(SHAPE) > 0.93).astype(np.uint8)  # many small components of all sizes
    pred[5:11, 5:11, 3:7] = 1
    truth = np.zeros(SHAPE, np.uint8)
    truth[5:10, 6:11, 3:7] = 1
    truth[15:18, 15:18, 5:8] = 1
    truth[20:22, 2:4, 9:11] = 1
    body = np.zeros(SHAPE, bool)
    body[3:21, 3:21, 1:11] = True
    parts = ClassComponents.of(pred == 1, truth == 1, body)
    for keep, applied in [(parts.all(), pred), (parts.largest(), keep_largest_component(pred, 1)),
                          (parts.in_body(), remove_outside(pred, 1, body)),
                          (parts.at_least(3), remove_small_components(pred, 3))]:
        row = evaluate_masks("c", 1, applied == 1, truth == 1, (1.0, 1.0, 1.0))
        dice, tp, fp, fn = parts.score(keep)
        assert dice == pytest.approx(row.dice)
        assert (tp, fp, fn) == (row.lesion_tp, row.lesion_fp, row.lesion_fn)
