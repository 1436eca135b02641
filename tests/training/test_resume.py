"""``--resume`` continues bit for bit: N epochs in one run give the weights of k epochs, an interruption,
a resume and N - k more epochs (CPU, loader in the main process, cached data, augmentation and dropout on).
"""

from __future__ import annotations

import pytest
import torch

import pipeline.training.trainer as trainer_module
from pipeline.config import load_config
from pipeline.model.checkpoint import load_checkpoint
from pipeline.training.trainer import Trainer
from tests.helpers import tiny_config_overrides, torch_threads, write_msd_dataset

AUGMENT = [f"augment.{name}_prob=0.5" for name in
           ("flip", "rotate", "scale", "elastic", "intensity_scale", "intensity_shift", "noise")]


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


class Interrupted(Exception):
    pass


def run_config(root, out_dir, epochs=3):
    # 5 training cases in batches of 2: 2 batches per pass, so 3 steps per epoch end mid-pass.
    return load_config(None, tiny_config_overrides(
        f"data.root={root}", f"train.out_dir={out_dir}", "data.val_cases=[case_005]",
        f"train.epochs={epochs}", "train.steps_per_epoch=3", "train.val_every=1", "train.warmup_epochs=1",
        "train.num_workers=0", "sampling.cache=true", "sampling.batch_size=2", "sampling.samples_per_volume=2",
        "model.dropout=0.1", *AUGMENT,
    ))


def interrupt_after(monkeypatch, epochs_done: int) -> None:
    """Stop the run (as a kill would) right after last.pt of epoch ``epochs_done`` is written."""
    original = Trainer.on_epoch_end

    def on_epoch_end(self, epoch, *args, **kwargs):
        original(self, epoch, *args, **kwargs)
        if epoch + 1 == epochs_done:
            raise Interrupted

    monkeypatch.setattr(Trainer, "on_epoch_end", on_epoch_end)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch_thread", "inline_loading"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch, prefetch):
    monkeypatch.setattr(trainer_module, "prefetch_depth", lambda device, workers: 2 if prefetch else 0)
    root = write_msd_dataset(tmp_path / "data", n_cases=6)

    whole = Trainer(run_config(root, tmp_path / "whole")).run()

    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(Interrupted):
            Trainer(run_config(root, tmp_path / "resumed")).run()
    assert load_checkpoint(tmp_path / "resumed" / "last.pt").epoch == 1
    resumed = Trainer(run_config(root, tmp_path / "resumed")).run(resume=True)

    expected, got = load_checkpoint(whole.last), load_checkpoint(resumed.last)
    assert got.epoch == expected.epoch == 3
    assert expected.state_dict.keys() == got.state_dict.keys()
    different = [k for k in expected.state_dict if not torch.equal(expected.state_dict[k], got.state_dict[k])]
    assert not different, f"weights differ after resuming: {different}"
    assert got.best_metric == expected.best_metric


def test_grad_scaler_state_is_saved_and_restored(tmp_path):
    root = write_msd_dataset(tmp_path / "data", n_cases=6)
    cfg = run_config(root, tmp_path / "run")
    saving = Trainer(cfg)
    saving.setup(resume=False)
    saving.scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=7)
    saving.scaler.scale(torch.ones(()))  # starts the scale
    saving.scaler.update(128.0)
    state = saving.scaler.state_dict()
    saving.on_epoch_end(0, 0.5, float("nan"), 1.0, 0.0)
    saving.close()

    resuming = Trainer(cfg)
    resuming.setup(resume=False)  # build everything, then restore into an enabled scaler
    resuming.close()
    resuming.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    resuming._restore()
    assert resuming.scaler.state_dict() == state
    assert resuming.scaler.get_scale() == 128.0
