"""End to end: ``medseg train --fold all`` (2 folds x 1 epoch x 2 steps) then ``medseg cv`` on a tiny
synthetic dataset: every case predicted exactly once, the evaluation files with evaluate's columns and
keys, post-processing chosen and recorded where ``segment`` reads it."""

from __future__ import annotations

import csv
import json

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.evaluate import COLUMNS, evaluate_folder
from pipeline.model.checkpoint import load_checkpoint
from tests.helpers import tiny_config_overrides, torch_threads, write_msd_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _train_args(root, out):
    return tiny_config_overrides(
        f"data.root={root}", f"train.out_dir={out}", "data.folds=2", "train.epochs=1", "train.steps_per_epoch=2",
        "train.warmup_epochs=0", "sampling.batch_size=1", "sampling.samples_per_volume=1", "train.device=cpu")


def test_train_folds_then_cv(tmp_path, capsys):
    root = write_msd_dataset(tmp_path / "data", n_cases=4, label_values=[1, 0, 1, 1])
    out = tmp_path / "run"
    config_file = tmp_path / "config.yaml"
    config_file.write_text("train:\n  seed: 0\n")
    assert main(["train", str(config_file), *_train_args(root, out), "--fold", "all", "--quiet"]) == 0
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits) == 2 and sorted(splits[0]["val"] + splits[1]["val"]) == [f"case_{n:03d}" for n in range(4)]

    assert main(["cv", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "mean Dice lesion:" in printed

    cv = out / "cv"
    cases = sorted(p.name for p in (cv / "predictions").iterdir())
    assert cases == [f"case_{n:03d}_seg.nii.gz" for n in range(4)]
    with open(cv / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert tuple(rows[0])[: len(COLUMNS)] == COLUMNS
    assert sorted(r["case_id"] for r in rows) == [f"case_{n:03d}" for n in range(4)]  # each case once, label 1
    _, reference = evaluate_folder(cv / "predictions", root / "labelsTr", options=None)
    summary = json.loads((cv / "summary.json").read_text())
    assert set(summary) == set(reference) | {"postprocessing"}
    assert summary["n_cases"] == 4 and summary["missing_predictions"] == []

    report = json.loads((cv / "postprocessing.json").read_text())
    assert set(report["chosen"]) == {"keep_largest", "restrict_to_body", "min_component_mm3"}
    assert {t["rule"] for t in report["tried"]} == {"keep_largest", "restrict_to_body", "min_component_mm3"}
    assert report["folds"] == [0, 1] and report["missing_folds"] == []
    assert summary["postprocessing"]["chosen"] == report["chosen"]
    steps = summary["postprocessing"]["combination"]["steps"]
    assert [s["rule"] for s in steps][-1] == "keep_largest" and all("dice_after" in s for s in steps)
    with open(cv / "metrics_postprocessed.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert set(json.loads((cv / "summary_postprocessed.json").read_text())) == set(reference)

    chosen = report["chosen"]
    for k in range(2):
        config = load_checkpoint(out / f"fold_{k}" / "best.pt").config
        assert config.postprocess.keep_largest == chosen["keep_largest"]
        assert config.postprocess.restrict_to_body == chosen["restrict_to_body"]
        assert config.inference.min_component_mm3 == chosen["min_component_mm3"]
    top = load_config(out / "config.yaml")
    assert top.postprocess.keep_largest == chosen["keep_largest"]
    assert top.inference.min_component_mm3 == chosen["min_component_mm3"]


def test_cv_with_a_missing_fold_says_which_and_evaluates_the_rest(tmp_path, capsys):
    root = write_msd_dataset(tmp_path / "data", n_cases=4)
    out = tmp_path / "run"
    config_file = tmp_path / "config.yaml"
    config_file.write_text("{}\n")
    assert main(["train", str(config_file), *_train_args(root, out), "--fold", "1", "--quiet"]) == 0
    assert not (out / "fold_0").exists()
    assert main(["cv", str(out), "--device", "cpu", "--quiet"]) == 0
    assert "no best.pt for fold(s) [0]" in capsys.readouterr().err
    splits = json.loads((out / "splits.json").read_text())
    predicted = sorted(p.name[: -len("_seg.nii.gz")] for p in (out / "cv" / "predictions").iterdir())
    assert predicted == sorted(splits[1]["val"])
    summary = json.loads((out / "cv" / "summary.json").read_text())
    assert summary["missing_predictions"] == sorted(splits[0]["val"])


def test_cv_without_splits_explains(tmp_path, capsys):
    assert main(["cv", str(tmp_path)]) == 2
    assert "no splits.json" in capsys.readouterr().err


def test_fold_flag_rejects_what_is_not_a_fold(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "configs/demo.yaml", "--fold", "two"])
    assert info.value.code == 2
    assert "expected a fold number (0, 1, ...) or 'all', got 'two'" in capsys.readouterr().err


def test_fold_beyond_data_folds_is_refused_before_training(tmp_path, capsys):
    config_file = tmp_path / "config.yaml"
    config_file.write_text("{}\n")
    assert main(["train", str(config_file), "data.folds=2", f"train.out_dir={tmp_path / 'run'}", "--fold", "2"]) == 2
    assert "--fold 2: expected 0 to 1 (data.folds=2)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("layout", ["nnunetv2", "msd_4d"])
def test_cv_on_two_channel_datasets(tmp_path, layout):
    """Multi-channel cases (nnU-Net v2 channel files, an MSD 4D file), two classes: every case once."""
    from tests.dataset.builders import write_msd_4d, write_nnunet_v2

    root = tmp_path / "data"
    written = write_nnunet_v2(root) if layout == "nnunetv2" else write_msd_4d(root)
    out = tmp_path / "run"
    config_file = tmp_path / "config.yaml"
    config_file.write_text("{}\n")
    args = [*_train_args(root, out), "preprocess.intensity.mode=auto", "postprocess.keep_largest=[edema]"]
    assert main(["train", str(config_file), *args, "--fold", "all", "--quiet"]) == 0
    assert main(["cv", str(out), "--device", "cpu", "--quiet"]) == 0
    with open(out / "cv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["case_id"], r["label"]) for r in rows) == sorted((c, str(v)) for c in written for v in (1, 2))
    report = json.loads((out / "cv" / "postprocessing.json").read_text())
    assert {t["class"] for t in report["tried"]} >= {"edema", "tumour"}
