"""Cross-validation folds: splits.json (seeded, stratified, written once, reused, refused when the cases
change), fewer cases than folds, and ``train --fold`` training on the fold's cases into fold_K/."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError, InputError
from pipeline.training import train_folds
from pipeline.training.data import training_cases
from pipeline.training.folds import fold_splits, make_splits
from pipeline.training.trainer import Trainer
from tests.helpers import tiny_config_overrides, torch_threads, write_msd_dataset

IDS = [f"case_{n:03d}" for n in range(10)]
LESION = [True, True, True, True, False, False, False, False, False, False]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def test_splits_are_exact_for_a_known_case_list():
    splits = make_splits(IDS, LESION, folds=3, seed=0)
    assert splits == [
        {"train": ["case_000", "case_001", "case_005", "case_007", "case_008", "case_009"],
         "val": ["case_002", "case_003", "case_004", "case_006"]},
        {"train": ["case_001", "case_002", "case_003", "case_004", "case_005", "case_006", "case_007"],
         "val": ["case_000", "case_008", "case_009"]},
        {"train": ["case_000", "case_002", "case_003", "case_004", "case_006", "case_008", "case_009"],
         "val": ["case_001", "case_005", "case_007"]},
    ]


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_splits_cover_every_case_once_and_are_stratified(folds):
    splits = make_splits(IDS, LESION, folds=folds, seed=3)
    assert len(splits) == folds
    vals = [case for split in splits for case in split["val"]]
    assert sorted(vals) == IDS  # every case validated exactly once
    for split in splits:
        assert sorted(split["train"] + split["val"]) == IDS and not set(split["train"]) & set(split["val"])
    sizes = [len(s["val"]) for s in splits]
    assert max(sizes) - min(sizes) <= 1
    lesion_ids = {c for c, flag in zip(IDS, LESION) if flag}
    with_lesion = [len(lesion_ids & set(s["val"])) for s in splits]
    assert max(with_lesion) - min(with_lesion) <= 1  # 4 lesion cases spread as evenly as folds allow


def test_splits_are_seeded():
    assert make_splits(IDS, LESION, 5, seed=1) == make_splits(IDS, LESION, 5, seed=1)
    assert make_splits(IDS, LESION, 5, seed=1) != make_splits(IDS, LESION, 5, seed=2)


def test_fewer_cases_than_folds_uses_one_fold_per_case(caplog):
    with caplog.at_level(logging.WARNING):
        splits = make_splits(IDS[:3], LESION[:3], folds=5, seed=0)
    assert [s["val"] for s in splits] == [["case_002"], ["case_000"], ["case_001"]]
    assert len(splits) == 3 and all(len(s["val"]) == 1 and len(s["train"]) == 2 for s in splits)
    assert "only 3 cases for data.folds=5: using 3 folds" in caplog.text


def test_folds_must_be_at_least_two():
    with pytest.raises(ConfigError, match="data.folds"):
        load_config(None, ["data.folds=1"])


def _dataset(tmp_path, n=6):
    # label value 0 makes a lesion-free case: cases 0, 2, 4 have lesions, 1, 3, 5 not
    return write_msd_dataset(tmp_path / "data", n_cases=n, label_values=[1, 0] * (n // 2))


def _config(root, out_dir, *extra):
    return load_config(None, tiny_config_overrides(
        f"data.root={root}", f"train.out_dir={out_dir}", "data.folds=3", "train.epochs=1",
        "train.steps_per_epoch=1", "train.warmup_epochs=0", "sampling.batch_size=1",
        "sampling.samples_per_volume=1", *extra))


def test_splits_json_is_written_once_stratified_and_reused(tmp_path):
    root = _dataset(tmp_path)
    config = _config(root, tmp_path / "run")
    items = training_cases(root)
    splits = fold_splits(tmp_path / "run", items, config)
    path = tmp_path / "run" / "splits.json"
    assert json.loads(path.read_text()) == splits
    for split in splits:  # 3 lesion cases, 3 lesion-free: one of each per fold
        assert len(split["val"]) == 2
        assert {int(c[-1]) % 2 for c in split["val"]} == {0, 1}
    # An existing file is read, not rewritten: an edited (valid) assignment is what the folds get.
    edited = [{"train": s["train"], "val": s["val"]} for s in reversed(splits)]
    path.write_text(json.dumps(edited))
    assert fold_splits(tmp_path / "run", items, config) == edited


def test_a_changed_case_list_is_refused_with_how_to_fix(tmp_path):
    root = _dataset(tmp_path)
    config = _config(root, tmp_path / "run")
    fold_splits(tmp_path / "run", training_cases(root), config)
    with pytest.raises(InputError, match=r"new: \['case_006', 'case_007'\].*Delete .*splits.json"):
        fold_splits(tmp_path / "run", training_cases(_dataset(tmp_path, n=8)), config)


def test_fold_trains_on_its_split_into_fold_k(tmp_path):
    root = _dataset(tmp_path)
    out = tmp_path / "run"
    trainer = Trainer(_config(root, out), fold=1)
    result = trainer.run()
    splits = json.loads((out / "splits.json").read_text())
    assert [i["case_id"] for i in trainer.val_items] == splits[1]["val"]
    assert sorted(i["case_id"] for i in trainer.train_items) == splits[1]["train"]
    assert result.best == out / "fold_1" / "best.pt"
    for name in ("best.pt", "last.pt", "log.csv", "config.yaml"):
        assert (out / "fold_1" / name).is_file()
    assert (out / "config.yaml").is_file() and not (out / "best.pt").exists()


def test_fold_number_out_of_range_is_refused(tmp_path):
    with pytest.raises(InputError, match=r"--fold 3: expected 0 to 2"):
        Trainer(_config(_dataset(tmp_path), tmp_path / "run"), fold=3)


def test_fold_all_trains_every_fold_and_skips_finished_ones(tmp_path, monkeypatch):
    root = _dataset(tmp_path)
    out = tmp_path / "run"
    results = train_folds(_config(root, out))
    assert [r.best for r in results] == [out / f"fold_{k}" / "best.pt" for k in range(3)]
    stamps = [(out / f"fold_{k}" / "last.pt").stat().st_mtime_ns for k in range(3)]

    def no_training(self, resume=False):
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(Trainer, "run", no_training)
    again = train_folds(_config(root, out))
    assert [r.epochs for r in again] == [1, 1, 1]
    assert [(out / f"fold_{k}" / "last.pt").stat().st_mtime_ns for k in range(3)] == stamps
