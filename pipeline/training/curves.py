"""``log.png`` beside the trainer's ``log.csv``: training loss and validation Dice per epoch."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from pipeline.figures import figure, save_png

__all__ = ["plot_training_curves"]


def plot_training_curves(log_csv: Path, path: Path) -> Path:
    """Training loss and validation Dice per epoch, from the trainer's ``log.csv``."""
    with open(log_csv, newline="") as handle:
        log = list(csv.DictReader(handle))
    epochs = [int(r["epoch"]) for r in log]
    loss = [_number(r.get("train_loss")) for r in log]
    val = [(e, _number(r.get("val_dice"))) for e, r in zip(epochs, log)]
    val = [(e, v) for e, v in val if not math.isnan(v)]
    fig, ax = figure(6.0, 3.8)
    ax.plot(epochs, loss, color="tab:blue", marker="." if len(epochs) < 50 else None, label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.grid(alpha=0.3)
    right = ax.twinx()
    if val:
        right.plot(*zip(*val), color="tab:orange", marker="o", label="validation Dice")
    right.set_ylim(0, 1)
    right.set_ylabel("validation Dice", color="tab:orange")
    ax.set_title("Training curves")
    return save_png(fig, path)


def _number(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan
