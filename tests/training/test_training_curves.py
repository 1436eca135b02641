"""Training curves: ``train`` writes ``log.png`` beside ``log.csv``; a plotting failure never fails training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline.training import curves as plots
from tests.helpers import tiny_config_overrides, torch_threads, write_msd_dataset

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_training_curves_from_a_log_with_gaps(tmp_path):
    log_csv = tmp_path / "log.csv"
    log_csv.write_text(
        "epoch,train_loss,val_dice,best_val_dice,lr,seconds,data_seconds\n"
        "1,0.91000,,,0.001,1.0,0.1\n"
        "2,0.70000,0.4100,0.4100,0.001,1.0,0.1\n"
        "3,0.65000,,0.4100,0.001,1.0,0.1\n"
    )
    out = plots.plot_training_curves(log_csv, tmp_path / "log.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv", "log.png"]


def test_training_writes_curves_and_survives_a_failing_plot(tmp_path, monkeypatch, caplog):
    from pipeline.config import load_config
    from pipeline.training import train

    write_msd_dataset(tmp_path / "ds", n_cases=3)
    config = load_config(ROOT / "configs" / "demo.yaml", tiny_config_overrides(
        f"data.root={tmp_path / 'ds'}", f"train.out_dir={tmp_path / 'run'}", "train.device=cpu",
        "train.epochs=2", "train.steps_per_epoch=1", "train.val_every=1", "train.warmup_epochs=0",
        "sampling.samples_per_volume=1", "sampling.batch_size=1",
    ))
    real, calls = plots.plot_training_curves, []

    def fails_first(log_csv, png):
        calls.append(png)
        if len(calls) == 1:
            raise RuntimeError("no fonts today")
        return real(log_csv, png)

    monkeypatch.setattr(plots, "plot_training_curves", fails_first)
    with torch_threads(1), caplog.at_level(logging.WARNING, logger="pipeline.training.trainer"):
        result = train(config)

    assert result.last.is_file() and result.log_csv.name == "log.csv"
    assert calls == [tmp_path / "run" / "log.png"] * 2  # plotted after every epoch
    assert (tmp_path / "run" / "log.png").read_bytes()[:8] == PNG_MAGIC
    assert any("could not plot the training curves" in r.getMessage() and "no fonts today" in r.getMessage()
               for r in caplog.records)


def test_missing_log_raises_and_leaves_no_picture(tmp_path):
    with pytest.raises(FileNotFoundError):
        plots.plot_training_curves(tmp_path / "log.csv", tmp_path / "log.png")
    assert list(tmp_path.iterdir()) == []
