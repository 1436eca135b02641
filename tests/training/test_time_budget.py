"""``train.max_minutes``: a run shortened to the epochs that fit its wall-clock budget, with the learning-rate
decay ending at the new last epoch, that epoch validated, and the shortened length kept across a resume."""

from __future__ import annotations

import csv

import pytest

import pipeline.training.trainer as trainer_module
from pipeline.config import load_config
from pipeline.model.checkpoint import load_checkpoint
from pipeline.training.trainer import Trainer, train_folds
from tests.helpers import tiny_config_overrides, torch_threads, write_msd_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


class Clock:
    """``time.perf_counter`` of the trainer module: each epoch's training takes ``epoch_s`` seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _config(root, out_dir, *extra):
    return load_config(None, tiny_config_overrides(
        f"data.root={root}", f"train.out_dir={out_dir}", "data.val_cases=[case_005]", "train.epochs=10",
        "train.steps_per_epoch=2", "train.val_every=4", "train.warmup_epochs=0", "sampling.cache=true",
        "sampling.batch_size=2", *extra))


def _timed(monkeypatch, epoch_s: float, validation_s: float) -> Clock:
    clock = Clock()
    monkeypatch.setattr(trainer_module.time, "perf_counter", clock)
    train_epoch, validate = Trainer.train_epoch, Trainer.validate

    def slow_epoch(self, epoch):
        clock.now += epoch_s
        return train_epoch(self, epoch)

    def slow_validate(self):
        clock.now += validation_s
        return validate(self)

    monkeypatch.setattr(Trainer, "train_epoch", slow_epoch)
    monkeypatch.setattr(Trainer, "validate", slow_validate)
    return clock


def test_a_run_past_its_budget_ends_at_the_epochs_that_fit(tmp_path, monkeypatch):
    root = write_msd_dataset(tmp_path / "data", n_cases=6)
    _timed(monkeypatch, epoch_s=10.0, validation_s=5.0)
    # 1 minute at 10 s an epoch: after epoch 1 (no validation yet) 5 more fit -> 6 epochs; epoch 4 validates
    # (5 s), so after epoch 5 (55 s spent, 11 s an epoch, 5 s kept for a last validation) none fits -> 5 epochs
    result = Trainer(_config(root, tmp_path / "run", "train.max_minutes=1")).run()
    assert result.epochs == 5
    rows = list(csv.DictReader(open(tmp_path / "run" / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["val_dice"] != ""  # the new last epoch validated
    # the decay was re-stretched to 6 epochs after the first: near its end, not halfway as in 10 epochs
    assert float(rows[-1]["lr"]) < 0.25 * float(rows[0]["lr"])
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last.epoch == 5 and last.extra["shortened_to"] == 5


def test_a_run_within_its_budget_is_unchanged(tmp_path, monkeypatch):
    root = write_msd_dataset(tmp_path / "data", n_cases=6)
    _timed(monkeypatch, epoch_s=1.0, validation_s=1.0)
    result = Trainer(_config(root, tmp_path / "run", "train.max_minutes=1", "train.epochs=4")).run()
    assert result.epochs == 4 and "shortened_to" not in load_checkpoint(tmp_path / "run" / "last.pt").extra


def test_a_shortened_fold_counts_as_finished(tmp_path, monkeypatch):
    root = write_msd_dataset(tmp_path / "data", n_cases=6)
    _timed(monkeypatch, epoch_s=10.0, validation_s=5.0)
    cfg = _config(root, tmp_path / "cv", "train.max_minutes=0.5", "data.folds=2", "data.val_cases=[]")
    first = train_folds(cfg)
    assert [r.epochs for r in first] == [3, 3]  # 30 s at 10 s an epoch
    again = train_folds(cfg)  # both folds reached their shortened length: nothing is trained again
    assert [r.epochs for r in again] == [3, 3]
    assert [load_checkpoint(r.last).epoch for r in again] == [3, 3]
