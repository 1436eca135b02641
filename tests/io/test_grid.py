"""``grid_difference``: the one rule for "same grid" (shape, affine entries within AFFINE_TOLERANCE_MM)."""

from __future__ import annotations

import numpy as np

from pipeline.io.geometry import AFFINE_TOLERANCE_MM, grid_difference
from tests.conftest import make_affine


def test_float32_header_rounding_is_within_tolerance():
    affine = make_affine("oblique", origin=(250.0, -480.0, 300.0))
    rounded = affine.astype(np.float32).astype(np.float64)
    assert grid_difference((2, 2, 2), affine, (2, 2, 2), rounded) is None
    moved = affine.copy()
    moved[1, 3] += 0.002
    assert grid_difference((2, 2, 2), affine, (2, 2, 2), moved).startswith("affine differs by up to 0.002 mm")
    assert grid_difference((2, 2, 2), affine, (2, 2, 3), affine) == "shape (2, 2, 3) vs (2, 2, 2)"
    assert AFFINE_TOLERANCE_MM == 1e-3
