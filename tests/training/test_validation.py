"""Validation Dice during training scores lesion-free cases as evaluation does, and best.pt holds the
weights of the best validated epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.evaluate import evaluate_arrays
from pipeline.model.checkpoint import load_checkpoint
from pipeline.training.trainer import Trainer
from tests.helpers import tiny_config_overrides, torch_threads, write_msd_dataset


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


class Threshold(torch.nn.Module):
    """Lesion wherever the input is above 0.5: a network whose output is known."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device

    def forward(self, x):
        return torch.cat([(0.5 - x) * 20, (x - 0.5) * 20], dim=1)


def validation_case(lesion: bool, bright_spot: bool) -> dict:
    """A 16×16×8 case; its lesion (if any) is bright, so ``Threshold`` finds it; a bright spot without a
    lesion is a false positive."""
    image = torch.zeros(1, 16, 16, 8)
    label = torch.zeros(1, 16, 16, 8)
    if lesion:
        image[0, 2:6, 2:6, 2:5] = 1.0
        label[0, 2:6, 2:6, 2:5] = 1.0
    if bright_spot:
        image[0, 10:13, 10:13, 4:6] = 1.0
    return {"image": image, "label": label}


def validating_trainer(cases: list[dict]) -> Trainer:
    trainer = Trainer(load_config(None, tiny_config_overrides()))
    trainer.model = Threshold()
    trainer.val_data = cases
    return trainer


def test_false_positive_on_a_lesion_free_case_lowers_the_validation_dice():
    found = validation_case(lesion=True, bright_spot=False)
    clean = validation_case(lesion=False, bright_spot=False)
    false_positive = validation_case(lesion=False, bright_spot=True)

    # Found lesion: 1; lesion-free case with nothing predicted: 1; lesion-free case with a false positive: 0.
    assert validating_trainer([found, clean]).validate() == pytest.approx(1.0)
    assert validating_trainer([found, false_positive]).validate() == pytest.approx(0.5)
    assert validating_trainer([clean]).validate() == pytest.approx(1.0)
    assert validating_trainer([false_positive]).validate() == pytest.approx(0.0)


def test_validation_dice_is_the_mean_of_evaluations_per_case_dice():
    cases = [validation_case(True, True), validation_case(False, True), validation_case(False, False)]
    per_case = []
    for case in cases:
        pred = (case["image"][0].numpy() > 0.5).astype(np.uint8)
        truth = case["label"][0].numpy().astype(np.uint8)
        rows = evaluate_arrays("c", pred, truth, (1.0, 1.0, 1.0), [1])
        per_case.append(np.mean([row.dice for row in rows]))
    assert validating_trainer(cases).validate() == pytest.approx(float(np.mean(per_case)))


def test_best_checkpoint_holds_the_best_validated_epoch(tmp_path, monkeypatch):
    root = write_msd_dataset(tmp_path / "data", n_cases=4)
    cfg = load_config(None, tiny_config_overrides(
        f"data.root={root}", f"train.out_dir={tmp_path / 'run'}", "data.val_fraction=0.25",
        "train.epochs=4", "train.steps_per_epoch=2", "train.val_every=1", "train.warmup_epochs=0",
        "sampling.batch_size=1", "sampling.samples_per_volume=1",
    ))
    scores = iter([0.2, 0.6, 0.4, 0.5])
    weights_at_validation: list[dict] = []

    def stub_validate(self):
        weights_at_validation.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return next(scores)

    monkeypatch.setattr(Trainer, "validate", stub_validate)
    result = Trainer(cfg).run()

    best = load_checkpoint(result.best)
    assert best.epoch == 2 and best.best_metric == pytest.approx(0.6)
    assert result.best_metric == pytest.approx(0.6)
    assert weights_at_validation[1].keys() == best.state_dict.keys()
    assert all(torch.equal(best.state_dict[k], weights_at_validation[1][k]) for k in best.state_dict)
    assert not all(torch.equal(best.state_dict[k], weights_at_validation[3][k]) for k in best.state_dict)
    assert load_checkpoint(result.last).epoch == 4
