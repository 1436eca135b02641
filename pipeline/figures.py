"""Matplotlib figures without a display, saved atomically as PNG: the one helper for every plot we write
(evaluation plots, training curves)."""

from __future__ import annotations

from pathlib import Path

from pipeline.io.atomic import atomic_path

__all__ = ["figure", "save_png"]


def figure(width: float, height: float):
    """A (figure, axes) pair of ``width`` × ``height`` inches at 100 dpi (no pyplot, no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically (a failed save leaves no file)."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path
