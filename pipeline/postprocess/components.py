"""Connected components: removing small predicted islands."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-neighbourhood


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected components of ``mask > 0``."""
    labels, count = ndimage.label(np.asarray(mask) > 0, structure=FULL_CONNECTIVITY)
    return labels, int(count)


def remove_small_components(labels: np.ndarray, min_voxels: float) -> np.ndarray:
    """Set to 0 every component (per class) of fewer than ``min_voxels`` voxels."""
    if min_voxels <= 0:
        return labels
    out = labels.copy()
    for value in np.unique(labels):
        if value == 0:
            continue
        components, count = label_components(labels == value)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())
        small = np.flatnonzero(sizes < min_voxels)
        small = small[small != 0]
        if small.size:
            out[np.isin(components, small)] = 0
    return out
