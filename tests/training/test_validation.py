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


def test_validation_through_the_segmenter_matches_monais_sliding_window():
    """Validation runs the public Segmenter (streamed windows, fused CPU copy): its probabilities equal
    MONAI's sliding window over the plain network, so the scores that choose best.pt are unchanged."""
    from pipeline.infer import Segmenter
    from pipeline.infer.sliding import predict_logits
    from pipeline.model import build_model

    torch.manual_seed(0)
    cfg = load_config(None, tiny_config_overrides(
        "model.features=4", "model.depth=3", "inference.roi_size=[32,32,16]", "inference.overlap=0.5"))
    network = build_model(cfg.model, in_channels=1, out_channels=2).eval()
    image = torch.randn(1, 50, 45, 20)
    with torch.no_grad():
        reference = predict_logits(network, image, cfg.inference, 3).softmax(0)
        ours = Segmenter(network, cfg, device="cpu", backend="torch").probabilities(image)
    assert ours.shape == reference.shape == (2, 50, 45, 20)
    assert (ours - reference).abs().max().item() < 1e-4

    label = (reference.argmax(0, keepdim=True)).float()  # the reference's own answer: Dice 1
    trainer = validating_trainer([{"image": image, "label": label}])
    trainer.model, trainer.cfg = network, cfg
    assert trainer.validate() == pytest.approx(1.0)
    assert trainer.model.training  # validation hands the network back in training mode


def test_training_reaches_inference_only_through_its_public_api():
    """Import direction: training imports ``pipeline.infer`` (the Segmenter) and the shared metric, never
    inference internals or evaluation."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "pipeline" / "training"
    imported = set()
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    sideways = sorted(m for m in imported if m.startswith(("pipeline.evaluate", "pipeline.infer.", "pipeline.batch")))
    assert sideways == []
    assert "pipeline.infer" in imported and "pipeline.metrics" in imported
