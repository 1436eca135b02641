"""QC picture per case: axial, coronal and sagittal slices with the mask outlined.

The slices go through the centroid of the largest lesion (the volume centre when there is none). The
volume is first re-oriented losslessly to the closest RAS frame, then shown in the radiological
convention: axial and coronal with the patient's right on the left of the picture, sagittal with
anterior on the left, superior up; the orientation letters are drawn at the edges. Pixels keep their
physical aspect ratio (from the voxel spacing). Intensities use a CT window in HU (the model's
``ct_window``) or, for MR (``zscore``), the 1st-99th percentiles of the scan.

matplotlib is imported here only, with the Agg canvas and without pyplot, so pictures can be drawn in
a background thread and on machines without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from pipeline.io.atomic import atomic_path
from pipeline.io.geometry import closest_canonical, voxel_spacing

DEFAULT_CT_WINDOW = (-160.0, 240.0)
COLOURS = ["#ff3b30", "#30d158", "#0a84ff", "#ffd60a", "#bf5af2", "#64d2ff", "#ff9f0a"]

# Each view: the fixed axis, then the axes shown as rows/columns; the letters (left, right, top, bottom).
_VIEWS = (
    ("axial", 2, ("R", "L", "A", "P")),
    ("coronal", 1, ("R", "L", "S", "I")),
    ("sagittal", 0, ("A", "P", "S", "I")),
)


def display_window(image: np.ndarray, intensity_mode: str = "ct_window",
                   ct_window: Optional[Sequence[float]] = None) -> tuple[float, float]:
    """(low, high) grey-level window: the CT window in HU, or the 1-99th percentiles (MR)."""
    if intensity_mode == "ct_window":
        low, high = ct_window if ct_window is not None else DEFAULT_CT_WINDOW
        return float(low), float(high)
    values = np.asarray(image).ravel()
    step = max(1, values.size // 1_000_000)
    low, high = np.percentile(values[::step], [1, 99])
    return float(low), float(high if high > low else low + 1.0)


def write_qc_png(
    out_path: Union[str, Path],
    image: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    *,
    centre_mm: Optional[Sequence[float]] = None,
    window: tuple[float, float] = DEFAULT_CT_WINDOW,
    title: str = "",
    dpi: int = 80,
) -> Path:
    """Draw the three views through ``centre_mm`` (world RAS; default the volume centre) to a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    affine = np.asarray(affine, dtype=np.float64)
    image, _ = closest_canonical(np.asarray(image), affine)
    labels, affine = closest_canonical(np.asarray(labels), affine)
    spacing = voxel_spacing(affine)
    centre = _centre_index(affine, labels.shape, centre_mm)
    values = [int(v) for v in np.unique(labels) if v > 0]

    fig = Figure(figsize=(12, 4.6), dpi=dpi, facecolor="black")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, (name, axis, letters) in zip(axes, _VIEWS):
        picture = _radiological(np.take(image, centre[axis], axis=axis))
        mask = _radiological(np.take(labels, centre[axis], axis=axis))
        rows_mm, cols_mm = [spacing[a] for a in range(3) if a != axis][::-1]
        ax.imshow(picture, cmap="gray", vmin=window[0], vmax=window[1], aspect=rows_mm / cols_mm,
                  interpolation="nearest")
        for n, value in enumerate(values):
            if (mask == value).any():
                ax.contour((mask == value).astype(np.float32), levels=[0.5], colors=[COLOURS[n % len(COLOURS)]],
                           linewidths=1.2)
        _letters(ax, letters, picture.shape)
        ax.set_axis_off()
        # Plain texts, not set_title/tight_layout: those measure every artist and double the drawing time.
        ax.text(0.5, 1.01, f"{name} {centre[axis] + 1}/{labels.shape[axis]}", color="white", fontsize=10,
                ha="center", va="bottom", transform=ax.transAxes)
    if title:
        fig.text(0.5, 0.98, title, color="white", fontsize=11, ha="center", va="top")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.88, wspace=0.05)
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png", facecolor=fig.get_facecolor())
    return out_path


def _centre_index(affine, shape, centre_mm) -> list[int]:
    if centre_mm is None:
        return [s // 2 for s in shape]
    ijk = np.linalg.solve(affine, [*centre_mm, 1.0])[:3]
    return [int(np.clip(np.rint(v), 0, s - 1)) for v, s in zip(ijk, shape)]


def _radiological(section: np.ndarray) -> np.ndarray:
    """A RAS section (first axis: columns, second: rows, both increasing R/A/S) flipped for display."""
    return np.ascontiguousarray(section.T[::-1, ::-1])


def _letters(ax, letters, shape) -> None:
    """Orientation letters just inside the picture's edges (data coordinates: they follow the aspect)."""
    left, right, top, bottom = letters
    rows, cols = shape
    style = dict(color="#ffd60a", fontsize=11, fontweight="bold")
    ax.text(cols * 0.02, rows / 2, left, ha="left", va="center", **style)
    ax.text(cols * 0.98, rows / 2, right, ha="right", va="center", **style)
    ax.text(cols / 2, rows * 0.02, top, ha="center", va="top", **style)
    ax.text(cols / 2, rows * 0.98, bottom, ha="center", va="bottom", **style)
