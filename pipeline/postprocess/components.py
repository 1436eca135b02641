"""Connected components: removing small predicted islands."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-neighbourhood


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected components of ``mask > 0`` (uint16 labels when they fit: half of int32's memory)."""
    mask = np.asarray(mask)
    # bool and unsigned masks are labelled as they are (non-zero is > 0 there): no full-size copy
    binary = mask if mask.dtype == bool or mask.dtype.kind == "u" else mask > 0
    try:
        labels = np.empty(binary.shape, dtype=np.uint16)
        count = ndimage.label(binary, structure=FULL_CONNECTIVITY, output=labels)
    except RuntimeError:  # more than 65535 components
        labels, count = ndimage.label(binary, structure=FULL_CONNECTIVITY)
    return labels, int(count)


def foreground_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The bounding box of the non-zero voxels (``None`` if there is none): labelling works inside it."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=others))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def remove_small_components(labels: np.ndarray, min_voxels: float, in_place: bool = False) -> np.ndarray:
    """Set to 0 every component (per class) of fewer than ``min_voxels`` voxels.

    Works inside the labels' bounding box: a lesion mask is a tiny part of a scan. ``in_place``: in
    ``labels`` itself (no copy of the volume), which is returned.
    """
    if min_voxels <= 0:
        return labels
    out = labels if in_place else labels.copy()
    box = foreground_box(labels)
    if box is None:
        return out
    inside = labels[box]
    values = [int(v) for v in np.unique(inside) if v != 0]
    target = out[box]
    for value in values:
        components, count = label_components(class_mask(inside, value, values))
        if count == 0:
            continue
        # sizes component by component, inside each one's box: no int64 copy of the label map (bincount)
        for index, piece in enumerate(ndimage.find_objects(components), start=1):
            if piece is None:
                continue
            own = components[piece] == index
            if int(np.count_nonzero(own)) < min_voxels:
                target[piece][own] = 0
        del components
    return out


def class_mask(labels: np.ndarray, value: int, values) -> np.ndarray:
    """What :func:`label_components` labels for class ``value``: ``labels == value``, or ``labels``
    itself when ``value`` is the only non-zero class present (``values``) and labels are unsigned: the
    same components without a boolean copy of the volume."""
    if list(values) == [value] and labels.dtype.kind == "u":
        return labels
    return labels == value
