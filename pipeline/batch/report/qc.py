"""QC picture per case: axial, coronal and sagittal slices with the mask outlined.

The slices go through the centroid of the largest lesion (the volume centre when there is none). The
volume is first re-oriented losslessly to the closest RAS frame, then shown in the radiological
convention: axial and coronal with the patient's right on the left of the picture, sagittal with
anterior on the left, superior up; the orientation letters are drawn at the edges. Pixels keep their
physical aspect ratio (from the voxel spacing), except that a view's short side is shown at least
:data:`MIN_EXTENT_RATIO` of its long side: the coronal and sagittal views of a thin slab (20 slices of
2 mm beside 500 mm in-plane) would be unreadable strips, so that axis is stretched and the view's title
says so ("z stretched ×3.1"). Intensities use a CT window in HU (the model's
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
MIN_EXTENT_RATIO = 0.25  # a view's short side is shown at least this fraction of its long side
_AXIS_NAMES = "xyz"  # RAS axes: x (R-L), y (A-P), z (S-I)
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
    fig = qc_figure(image, labels, affine, centre_mm=centre_mm, window=window, title=title, dpi=dpi)
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png", facecolor=fig.get_facecolor())
    return out_path


def qc_figure(image: np.ndarray, labels: np.ndarray, affine: np.ndarray, *,
              centre_mm: Optional[Sequence[float]] = None, window: tuple[float, float] = DEFAULT_CT_WINDOW,
              title: str = "", dpi: int = 80):
    """The matplotlib ``Figure`` of :func:`write_qc_png` (axial, coronal, sagittal axes in that order)."""
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
        aspect, note = view_aspect(labels.shape, spacing, axis)
        ax.imshow(picture, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
        for n, value in enumerate(values):
            if (mask == value).any() and min(mask.shape) >= 2:  # a contour needs a 2x2 picture
                ax.contour((mask == value).astype(np.float32), levels=[0.5], colors=[COLOURS[n % len(COLOURS)]],
                           linewidths=1.2)
        _letters(ax, letters, picture.shape)
        ax.set_axis_off()
        # Plain texts, not set_title/tight_layout: those measure every artist and double the drawing time.
        ax.text(0.5, 1.01, f"{name} {centre[axis] + 1}/{labels.shape[axis]}" + (f"  ({note})" if note else ""),
                color="white", fontsize=10, ha="center", va="bottom", transform=ax.transAxes)
    if title:
        fig.text(0.5, 0.98, title, color="white", fontsize=11, ha="center", va="top")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.88, wspace=0.05)
    return fig


def view_aspect(shape: Sequence[int], spacing: Sequence[float], axis: int) -> tuple[float, str]:
    """(imshow aspect, note) of the view across ``axis`` of a RAS volume of ``shape`` and ``spacing``.

    The aspect is the pixels' height/width in mm; when the view would be shown less than
    :data:`MIN_EXTENT_RATIO` as tall as wide (or as wide as tall) its short axis is stretched to that
    ratio, and the note names it: ``"z stretched ×3.1"``; else the note is empty.
    """
    col_axis, row_axis = [a for a in range(3) if a != axis]  # the section's transpose: rows are the later axis
    rows_mm, cols_mm = float(spacing[row_axis]), float(spacing[col_axis])
    height, width = shape[row_axis] * rows_mm, shape[col_axis] * cols_mm
    aspect, note = rows_mm / cols_mm, ""
    if height < MIN_EXTENT_RATIO * width:
        factor = MIN_EXTENT_RATIO * width / height
        aspect, note = aspect * factor, f"{_AXIS_NAMES[row_axis]} stretched ×{factor:.1f}"
    elif width < MIN_EXTENT_RATIO * height:
        factor = MIN_EXTENT_RATIO * height / width
        aspect, note = aspect / factor, f"{_AXIS_NAMES[col_axis]} stretched ×{factor:.1f}"
    return aspect, note


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
