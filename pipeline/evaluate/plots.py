"""PNG plots: evaluation figures and training curves.

matplotlib is imported inside the functions and used through ``Figure`` objects with the Agg canvas
(no pyplot state, no display needed, safe in threads). Files are written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.figures import figure as _figure
from pipeline.figures import save_png as _save

EVALUATION_PLOTS = ("dice.png", "detection_by_size.png", "volumes.png")


def write_evaluation_plots(rows: Sequence, summary: dict, out_dir: Path) -> list[Path]:
    """``dice.png`` (per-case Dice), ``detection_by_size.png`` (detection rate per lesion size bin),
    ``volumes.png`` (predicted vs true volume)."""
    out_dir = Path(out_dir)
    return [
        plot_dice(rows, out_dir / "dice.png"),
        plot_detection_by_size(summary, out_dir / "detection_by_size.png"),
        plot_volumes(rows, out_dir / "volumes.png"),
    ]


def plot_dice(rows: Sequence, path: Path) -> Path:
    """Box plot with the per-case points over it, one box per label, over the cases whose ground truth has
    the label."""
    labels = sorted({r.label for r in rows})
    fig, ax = _figure(max(4.8, 1.2 * len(labels) + 2.5), 4.2)
    values = [[r.dice for r in rows if r.label == label and r.lesions_gt > 0] for label in labels]
    positions = np.arange(1, len(labels) + 1)
    if any(values):
        kept = [(p, v) for p, v in zip(positions, values) if v]
        ax.boxplot([v for _, v in kept], positions=[p for p, _ in kept], widths=0.5, showfliers=False)
        rng = np.random.default_rng(0)
        for p, v in kept:
            ax.scatter(p + rng.uniform(-0.12, 0.12, len(v)), v, s=14, alpha=0.7, color="tab:blue", zorder=3)
    else:
        ax.text(0.5, 0.5, "no case with ground-truth lesions", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_xticks(positions, [f"label {label}\n(n={len(v)})" for label, v in zip(labels, values)])
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("Dice")
    ax.set_title("Per-case Dice\n(cases whose ground truth has the label)", fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_detection_by_size(summary: dict, path: Path) -> Path:
    """Grouped bars: fraction of ground-truth lesions detected per size bin, one colour per label."""
    per_label = summary.get("per_label", {})
    bins = list(next(iter(per_label.values()), {}).get("size_bins", {}))
    fig, ax = _figure(max(5.0, 1.6 * len(bins) + 2.0), 4.0)
    width = 0.8 / max(len(per_label), 1)
    for k, (label, stats) in enumerate(per_label.items()):
        x = np.arange(len(bins)) + (k - (len(per_label) - 1) / 2) * width
        counts = [stats["size_bins"][b] for b in bins]
        rates = [c["lesion_recall"] for c in counts]
        heights = [0.0 if _missing(r) else r for r in rates]
        bars = ax.bar(x, heights, width=width * 0.9, label=f"label {label}")
        for bar, c in zip(bars, counts):
            top_centre = (bar.get_x() + bar.get_width() / 2, bar.get_height())
            ax.annotate(f"{c['lesion_tp']}/{c['lesions_gt']}", top_centre, ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(np.arange(len(bins)), [_bin_title(b) for b in bins])
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("lesions detected (recall)")
    ax.set_xlabel("ground-truth lesion volume")
    ax.set_title("Lesion detection rate by size (detected / ground-truth lesions)")
    if len(per_label) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_volumes(rows: Sequence, path: Path) -> Path:
    """Predicted against ground-truth volume (ml) per case, with the identity line."""
    fig, ax = _figure(4.6, 4.4)
    shown = [r for r in rows if not (r.gt_empty and r.pred_empty)]
    for label in sorted({r.label for r in shown}):
        points = [(r.volume_gt_ml, r.volume_pred_ml) for r in shown if r.label == label]
        ax.scatter(*zip(*points), s=16, alpha=0.8, label=f"label {label}")
    top = max([max(r.volume_gt_ml, r.volume_pred_ml) for r in shown] + [1e-3]) * 1.05
    ax.plot([0, top], [0, top], color="grey", linewidth=1, linestyle="--", label="identity")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("ground-truth volume (ml)")
    ax.set_ylabel("predicted volume (ml)")
    ax.set_title("Predicted vs true volume per case")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# --- helpers -------------------------------------------------------------------------------------


def _bin_title(name: str) -> str:
    if name.startswith("lt"):
        return f"< {name[2:]} mm³"
    if name.startswith("ge"):
        return f"≥ {name[2:]} mm³"
    if "to" in name:
        low, high = name.split("to")
        return f"{low}–{high} mm³"
    return name


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
