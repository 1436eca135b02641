"""Seeded random masks shared by the evaluation tests."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def random_blob(shape=(30, 26, 18), seed=0, level=0.05, sigma=2.0) -> np.ndarray:
    """Smooth random blobs: several irregular components of varied size."""
    noise = np.random.default_rng(seed).normal(size=shape)
    return ndimage.gaussian_filter(noise, sigma) > level
