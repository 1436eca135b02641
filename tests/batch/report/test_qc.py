"""QC pictures of thin volumes: no view is drawn as an unreadable strip (pipeline/batch/report/qc.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.batch.report.qc import MIN_EXTENT_RATIO, qc_figure, view_aspect, write_qc_png
from tests.conftest import make_affine


def displayed_ratio(ax, picture_shape) -> float:
    """Height / width of the picture as drawn: rows × aspect / columns."""
    rows, cols = picture_shape
    return rows * float(ax.get_aspect()) / cols


def test_thin_slab_views_are_stretched_and_say_so(tmp_path):
    shape, spacing = (512, 512, 20), (0.98, 0.98, 2.0)
    image = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint8)
    labels[200:230, 240:260, 8:12] = 1
    fig = qc_figure(image, labels, make_affine("RAS", spacing=spacing))
    axial, coronal, sagittal = fig.axes
    for ax, picture in ((coronal, (20, 512)), (sagittal, (20, 512))):
        assert displayed_ratio(ax, picture) == pytest.approx(MIN_EXTENT_RATIO)  # 40 mm beside 502 mm: ×3.1
        assert any("z stretched ×3.1" in t.get_text() for t in ax.texts)
    assert float(axial.get_aspect()) == pytest.approx(1.0)
    assert not any("stretched" in t.get_text() for t in axial.texts)
    write_qc_png(tmp_path / "thin.png", image, labels, make_affine("RAS", spacing=spacing))  # draws


@pytest.mark.parametrize("shape, spacing", [((512, 512, 300), (0.8, 0.8, 1.0)), ((160, 160, 48), (0.8, 0.8, 2.5)),
                                            ((24, 24, 12), (1.0, 1.0, 2.5))])
def test_ordinary_volumes_keep_their_true_aspect(shape, spacing):
    for axis in range(3):
        rows_mm, cols_mm = [spacing[a] for a in range(3) if a != axis][::-1]
        assert view_aspect(shape, spacing, axis) == (pytest.approx(rows_mm / cols_mm), "")


def test_a_narrow_width_is_stretched_too():
    # 10 voxels of 1 mm across x beside 300 mm along z: the coronal view's columns (x) are stretched
    aspect, note = view_aspect((10, 200, 300), (1.0, 1.0, 1.0), axis=1)
    assert note == "x stretched ×7.5" and 300 * aspect / 10 == pytest.approx(1 / MIN_EXTENT_RATIO)
