"""Evaluating folders of NIfTI masks: pairing, grid checks, labels, edge cases, the summary and the outputs
(metrics.csv, summary.json, PNGs), through the Python API and ``medseg evaluate``."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.evaluate import (
    COLUMNS,
    CaseMetrics,
    EvaluationOptions,
    evaluate_case,
    evaluate_folder,
    summarise,
)
from pipeline.io.atomic import json_safe
from tests.conftest import make_affine, save_nifti

SHAPE = (24, 24, 12)
AFFINE = make_affine("LPS")  # 0.8 × 0.9 × 2.5 mm: 1.8 mm³ voxels
CONTRACT = [
    "case_id", "label", "dice", "iou", "hd95_mm", "assd_mm", "nsd", "volume_pred_ml", "volume_gt_ml",
    "volume_diff_ml", "lesions_gt", "lesions_pred", "lesion_tp", "lesion_fp", "lesion_fn", "lesion_precision",
    "lesion_recall", "lesion_f1",
]
PNGS = ["detection_by_size.png", "dice.png", "volumes.png"]


def three_lesions_layout():
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:5, 2:5, 2:4] = 1
    gt[10:14, 10:14, 5:8] = 1
    gt[18:21, 2:5, 8:10] = 1
    pred = np.zeros(SHAPE, np.uint8)
    pred[2:5, 2:5, 2:4] = 1
    pred[13:16, 13:16, 7:9] = 1
    pred[2:4, 18:21, 9:11] = 1
    return pred, gt


def write_pair(tmp_path, case, pred, gt, pred_affine=None, pred_name=None):
    save_nifti(pred, AFFINE if pred_affine is None else pred_affine,
               tmp_path / "pred" / (pred_name or f"{case}_seg.nii.gz"))
    save_nifti(gt, AFFINE, tmp_path / "gt" / f"{case}.nii.gz")


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- evaluate_folder -------------------------------------------------------------------------------


def test_writes_metrics_summary_and_plots(tmp_path):
    pred, gt = three_lesions_layout()
    write_pair(tmp_path, "case_a", pred, gt)
    write_pair(tmp_path, "case_b", gt, gt)
    save_nifti(gt, AFFINE, tmp_path / "gt" / "case_c.nii.gz")  # no prediction: skipped, listed

    rows, summary = evaluate_folder(tmp_path / "pred", tmp_path / "gt", tmp_path / "report")

    assert [(r.case_id, r.label) for r in rows] == [("case_a", 1), ("case_b", 1)]
    a, b = rows
    assert (b.dice, b.iou, b.hd95_mm, b.assd_mm, b.nsd) == (1.0, 1.0, 0.0, 0.0, 1.0)
    assert (b.lesion_tp, b.lesion_fp, b.lesion_fn) == (3, 0, 0)
    assert (a.lesion_tp, a.lesion_fp, a.lesion_fn) == (2, 1, 1)
    assert a.lesion_precision == pytest.approx(2 / 3) and a.lesion_recall == pytest.approx(2 / 3)
    assert a.volume_gt_ml == pytest.approx(int(gt.sum()) * 1.8 / 1000)
    assert a.volume_diff_ml == pytest.approx((int(pred.sum()) - int(gt.sum())) * 1.8 / 1000)
    assert a.hd95_mm > 0 and 0 < a.nsd < 1

    table = read_csv(tmp_path / "report" / "metrics.csv")
    assert list(table[0])[: len(CONTRACT)] == CONTRACT == list(COLUMNS)
    assert list(table[0])[len(CONTRACT):] == [
        f"{count}_{name}" for name in ("lt100", "100to1000", "ge1000")
        for count in ("lesions_gt", "lesion_tp", "lesion_fn", "lesions_pred", "lesion_fp")
    ]
    assert [t["case_id"] for t in table] == ["case_a", "case_b"]
    assert float(table[0]["hd95_mm"]) == pytest.approx(a.hd95_mm)
    assert table[0]["lesion_fp"] == "1" and table[0]["label"] == "1"

    saved = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert saved["n_cases"] == 2 and saved["missing_predictions"] == ["case_c"]
    assert saved["lesion_recall"] == pytest.approx(5 / 6)
    assert saved["lesion_precision"] == pytest.approx(5 / 6)
    assert saved["mean_dice"] == pytest.approx((a.dice + 1.0) / 2)
    dice_stats = saved["per_label"]["1"]["metrics"]["dice"]
    assert dice_stats["mean"] == pytest.approx((a.dice + 1.0) / 2)
    assert dice_stats["std"] == pytest.approx(np.std([a.dice, 1.0], ddof=1))
    assert dice_stats["n"] == 2 and dice_stats["n_nan"] == 0
    assert saved["settings"] == {"labels": [1], "nsd_tolerance_mm": 1.0, "min_overlap_iou": 0.0,
                                 "size_bins_mm3": [100.0, 1000.0]}
    assert saved == json_safe(summary)

    report = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert report == sorted(["metrics.csv", "summary.json", *PNGS])  # no temporary files left
    for name in PNGS:
        assert (tmp_path / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prediction_named_like_the_ground_truth_and_a_dataset_root(tmp_path):
    _, gt = three_lesions_layout()
    save_nifti(gt, AFFINE, tmp_path / "pred" / "liver_7.nii.gz")
    save_nifti(gt, AFFINE, tmp_path / "dataset" / "labelsTs" / "liver_7.nii.gz")
    rows, summary = evaluate_folder(tmp_path / "pred", tmp_path / "dataset")
    assert [r.case_id for r in rows] == ["liver_7"] and rows[0].dice == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "pred"]  # no out_dir: nothing written


def test_case_ids_may_hold_dots(tmp_path):
    _, gt = three_lesions_layout()
    write_pair(tmp_path, "sub-01.ses-2", gt, gt)
    rows, _ = evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    assert rows[0].case_id == "sub-01.ses-2"


def test_edge_cases_and_their_counts(tmp_path):
    _, gt = three_lesions_layout()
    empty = np.zeros(SHAPE, np.uint8)
    write_pair(tmp_path, "both_empty", empty, empty)
    write_pair(tmp_path, "missed", empty, gt)
    write_pair(tmp_path, "spurious", gt, empty)
    write_pair(tmp_path, "perfect", gt, gt)
    rows, summary = evaluate_folder(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    by_case = {r.case_id: r for r in rows}

    both = by_case["both_empty"]
    assert (both.dice, both.iou, both.hd95_mm, both.assd_mm, both.nsd) == (1.0, 1.0, 0.0, 0.0, 1.0)
    for case in ("missed", "spurious"):
        r = by_case[case]
        assert r.dice == 0.0 and r.nsd == 0.0 and math.isnan(r.hd95_mm) and math.isnan(r.assd_mm)
    assert (summary["n_both_empty"], summary["n_empty_pred"], summary["n_empty_gt"]) == (1, 1, 1)
    assert summary["n_distance_undefined"] == 2
    assert summary["per_label"]["1"]["metrics"]["hd95_mm"]["n_nan"] == 2
    assert summary["per_label"]["1"]["metrics"]["hd95_mm"]["n"] == 2
    # mean_dice: the cases whose ground truth has lesions (missed: 0, perfect: 1)
    assert summary["mean_dice"] == pytest.approx(0.5) and summary["n_cases_with_lesions"] == 2
    assert summary["false_positive_lesions_in_empty_cases"] == 3

    table = {t["case_id"]: t for t in read_csv(tmp_path / "out" / "metrics.csv")}
    assert table["missed"]["hd95_mm"] == "nan"
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())  # strict JSON: NaN → null
    assert saved["per_label"]["1"]["lesion_precision"] == pytest.approx(3 / 6)  # 3 tp (perfect), 3 fp
    assert "NaN" not in (tmp_path / "out" / "summary.json").read_text()


def test_only_empty_cases_are_label_1_and_give_null_not_nan(tmp_path):
    empty = np.zeros(SHAPE, np.uint8)
    write_pair(tmp_path, "x", empty, empty)
    rows, summary = evaluate_folder(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    assert [(r.case_id, r.label, r.dice, r.nsd) for r in rows] == [("x", 1, 1.0, 1.0)]
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert saved["mean_dice"] is None and saved["lesion_recall"] is None and saved["n_cases"] == 1
    assert saved["n_both_empty"] == 1
    assert [t["dice"] for t in read_csv(tmp_path / "out" / "metrics.csv")] == ["1.0"]


def test_labels_default_to_all_found_and_can_be_restricted(tmp_path):
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:6, 2:6, 2:6] = 1
    gt[12:18, 12:18, 4:8] = 2
    pred = gt.copy()
    pred[12:18, 12:18, 4:6] = 0  # label 2 half found
    only_one = np.zeros(SHAPE, np.uint8)
    only_one[2:6, 2:6, 2:6] = 1
    write_pair(tmp_path, "a", pred, gt)
    write_pair(tmp_path, "b", only_one, only_one)

    rows, summary = evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    assert [(r.case_id, r.label) for r in rows] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    a2, b2 = rows[1], rows[3]
    assert a2.dice == pytest.approx(2 * 72 / (72 + 144))
    assert (b2.dice, b2.hd95_mm, b2.lesions_gt) == (1.0, 0.0, 0)  # label absent from both masks of b
    assert summary["labels"] == [1, 2] and set(summary["per_label"]) == {"1", "2"}

    options = EvaluationOptions(labels=(2,))
    rows, summary = evaluate_folder(tmp_path / "pred", tmp_path / "gt", options=options)
    assert [(r.case_id, r.label) for r in rows] == [("a", 2), ("b", 2)]
    assert summary["labels"] == [2]


def test_evaluate_case_on_paths(tmp_path):
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:6, 2:6, 2:6] = 2
    write_pair(tmp_path, "c", gt, gt)
    rows = evaluate_case("c", tmp_path / "pred" / "c_seg.nii.gz", tmp_path / "gt" / "c.nii.gz")
    assert [(r.label, r.dice, r.lesions_gt) for r in rows] == [(2, 1.0, 1)]
    assert rows[0].volume_gt_ml == pytest.approx(64 * 1.8 / 1000)


def test_options_reach_the_metrics(tmp_path):
    pred, gt = three_lesions_layout()
    write_pair(tmp_path, "a", pred, gt)
    options = EvaluationOptions(nsd_tolerance_mm=50.0, min_overlap_iou=0.5, size_bins_mm3=(50,))
    rows, summary = evaluate_folder(tmp_path / "pred", tmp_path / "gt", options=options)
    assert rows[0].nsd == 1.0
    assert (rows[0].lesion_tp, rows[0].lesion_fn, rows[0].lesion_fp) == (1, 2, 2)
    assert set(rows[0].by_size) == {"lt50", "ge50"}
    assert set(summary["size_bins"]) == {"lt50", "ge50"}


@pytest.mark.parametrize("bad", [dict(labels=(0,)), dict(nsd_tolerance_mm=-1.0), dict(min_overlap_iou=2.0),
                                 dict(size_bins_mm3=(1000, 100))])
def test_bad_options(bad):
    with pytest.raises(InputError):
        EvaluationOptions(**bad)


@pytest.mark.parametrize("mismatch", ["shape", "affine"])
def test_grid_mismatch_names_the_case(tmp_path, mismatch):
    _, gt = three_lesions_layout()
    write_pair(tmp_path, "good", gt, gt)
    if mismatch == "shape":
        write_pair(tmp_path, "liver_3", gt[:, :, :10], gt)
    else:
        write_pair(tmp_path, "liver_3", gt, gt, pred_affine=make_affine("RAS"))
    with pytest.raises(InputError) as info:
        evaluate_folder(tmp_path / "pred", tmp_path / "gt", tmp_path / "out")
    message = str(info.value)
    assert "case liver_3" in message and "not on the same grid" in message and "good" not in message
    if mismatch == "shape":
        assert "(24, 24, 10)" in message and "(24, 24, 12)" in message
    assert not (tmp_path / "out").exists()


def test_every_mismatching_case_is_named(tmp_path):
    _, gt = three_lesions_layout()
    write_pair(tmp_path, "one", gt[:, :, :10], gt)
    write_pair(tmp_path, "two", gt, gt, pred_affine=make_affine("RAS"))
    with pytest.raises(InputError, match="2 cases are not on the same grid") as info:
        evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    assert "case one" in str(info.value) and "case two" in str(info.value)


def test_missing_folders(tmp_path):
    with pytest.raises(InputError, match="ground-truth folder not found"):
        evaluate_folder(tmp_path / "pred", tmp_path / "nothing")
    (tmp_path / "gt").mkdir()
    with pytest.raises(InputError, match="prediction folder not found"):
        evaluate_folder(tmp_path / "nothing", tmp_path / "gt")


def test_no_matching_prediction(tmp_path):
    save_nifti(np.zeros(SHAPE, np.uint8), AFFINE, tmp_path / "gt" / "a.nii.gz")
    save_nifti(np.zeros(SHAPE, np.uint8), AFFINE, tmp_path / "pred" / "b_seg.nii.gz")
    with pytest.raises(InputError) as info:
        evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    assert "_seg.nii.gz" in str(info.value) and str(tmp_path / "pred") in str(info.value)


def test_float_labels_are_rounded(tmp_path):
    _, gt = three_lesions_layout()
    write_pair(tmp_path, "f", gt.astype(np.float32), gt)
    rows, _ = evaluate_folder(tmp_path / "pred", tmp_path / "gt")
    assert rows[0].dice == 1.0


# --- summarise -------------------------------------------------------------------------------------


def row(case_id, dice, gt, pred, tp, fp, fn, label=1) -> CaseMetrics:
    nan = float("nan")
    return CaseMetrics(case_id, label, dice, dice, 1.0, 0.5, 0.9, 1.0 * pred, 1.0 * gt, 1.0 * (pred - gt), gt,
                       pred, tp, fp, fn, nan, nan, nan)


def test_summary_pools_cases():
    rows = [row("a", 0.8, 2, 2, 2, 0, 0), row("b", 0.4, 2, 3, 1, 2, 1), row("empty", 0.0, 0, 1, 0, 1, 0)]
    summary = summarise(rows)
    assert summary["mean_dice"] == pytest.approx(0.6)  # cases without lesions are left out
    assert summary["median_dice"] == pytest.approx(0.6)
    assert summary["lesion_recall"] == pytest.approx(3 / 4)
    assert summary["lesion_precision"] == pytest.approx(3 / 6)
    assert summary["lesion_f1"] == pytest.approx(2 * 3 / (2 * 3 + 3 + 1))
    assert summary["false_positive_lesions_in_empty_cases"] == 1
    assert summary["per_label"]["1"]["metrics"]["dice"]["mean"] == pytest.approx(0.4)  # all cases here
    assert summary["n_empty_gt"] == 1 and summary["n_distance_undefined"] == 1


# --- medseg evaluate -------------------------------------------------------------------------------


def test_cli_writes_outputs_and_prints_the_table(tmp_path, capsys):
    pred, gt = three_lesions_layout()
    write_pair(tmp_path, "c1", gt, gt)
    write_pair(tmp_path, "c2", pred, gt)
    code, out, err = run(capsys, "evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out",
                         str(tmp_path / "report"), "-q")
    assert code == 0, err
    assert "c1" in out and "1.000" in out and "lesion recall: 0.83" in out
    assert out.strip().splitlines()[-2].startswith("mean lesion Dice: ")
    assert "HD95 median" in out
    assert list(read_csv(tmp_path / "report" / "metrics.csv")[0])[: len(CONTRACT)] == CONTRACT
    assert (tmp_path / "report" / "summary.json").is_file()
    assert all((tmp_path / "report" / name).is_file() for name in PNGS)


def test_cli_options(tmp_path, capsys):
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:6, 2:6, 2:6] = 1
    gt[12:18, 12:18, 4:8] = 2
    write_pair(tmp_path, "a", gt, gt)
    code, out, err = run(capsys, "evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out",
                         str(tmp_path / "r"), "--labels", "2", "--nsd-tolerance", "2.5", "--min-overlap-iou",
                         "0.3", "--size-bins", "50", "-q")
    assert code == 0, err
    table = read_csv(tmp_path / "r" / "metrics.csv")
    assert [t["label"] for t in table] == ["2"]
    assert "lesion_tp_lt50" in table[0] and "lesion_fp_ge50" in table[0]
    saved = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert saved["settings"] == {"labels": [2], "nsd_tolerance_mm": 2.5, "min_overlap_iou": 0.3,
                                 "size_bins_mm3": [50.0]}


@pytest.mark.parametrize("option", [["--min-overlap-iou", "1.5"], ["--size-bins", "1000", "100"],
                                    ["--labels", "0"], ["--nsd-tolerance", "-1"]])
def test_cli_bad_option_values(tmp_path, capsys, option):
    _, gt = three_lesions_layout()
    write_pair(tmp_path, "a", gt, gt)
    code, out, err = run(capsys, "evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), *option)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err


def test_cli_grid_mismatch_exits_2_naming_the_case(tmp_path, capsys):
    _, gt = three_lesions_layout()
    write_pair(tmp_path, "ok", gt, gt)
    write_pair(tmp_path, "bad_case", gt[:, :, :10], gt)
    code, out, err = run(capsys, "evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out",
                         str(tmp_path / "r"), "-q")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "case bad_case" in lines[0] and "not on the same grid" in lines[0]
    assert not (tmp_path / "r").exists()
