"""Connected components: removing small predicted islands."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from pipeline.postprocess.slab_components import FULL_CONNECTIVITY, SlabComponents, slab_step

__all__ = ["FULL_CONNECTIVITY", "class_mask", "foreground_box", "label_components", "present_values",
           "remove_small_components"]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 26-connected components of ``mask > 0`` (uint16 labels when they fit: half of int32's memory).

    A full-size label map: the segment path's rules and lesion statistics use
    :class:`~pipeline.postprocess.slab_components.SlabComponents` instead (the same components, slab by slab).
    """
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


def present_values(labels: np.ndarray) -> list[int]:
    """The distinct non-zero values of ``labels``, ascending: ``np.unique`` slab by slab (``np.unique`` of
    the whole array sorts a full-size copy)."""
    if labels.ndim == 0 or labels.size == 0:
        return []
    step = slab_step(labels.shape) if labels.ndim > 1 else labels.shape[0]
    found: set[int] = set()
    for k0 in range(0, labels.shape[0], step):
        found.update(int(v) for v in np.unique(labels[k0:k0 + step]))
    return sorted(v for v in found if v != 0)


def remove_small_components(labels: np.ndarray, min_voxels: float, in_place: bool = False) -> np.ndarray:
    """Set to 0 every component (per class) of fewer than ``min_voxels`` voxels.

    Works inside the labels' bounding box (a lesion mask is a tiny part of a scan), labelling it slab by
    slab (:class:`~pipeline.postprocess.slab_components.SlabComponents`: no full-size label map).
    ``in_place``: in ``labels`` itself (no copy of the volume), which is returned.
    """
    if min_voxels <= 0:
        return labels
    out = labels if in_place else labels.copy()
    box = foreground_box(labels)
    if box is None:
        return out
    inside = labels[box]
    target = out[box]
    for value in present_values(inside):
        components = SlabComponents(inside, value)
        small = np.zeros(components.count + 1, dtype=bool)
        small[1:] = components.sizes < min_voxels
        if not small.any():
            continue
        # only the slabs holding a small component are labelled again
        for k0, k1, slab in components.slabs(only=np.flatnonzero(small)):
            target[k0:k1][small[slab]] = 0
    return out


def class_mask(labels: np.ndarray, value: int, values) -> np.ndarray:
    """What :func:`label_components` labels for class ``value``: ``labels == value``, or ``labels``
    itself when ``value`` is the only non-zero class present (``values``) and labels are unsigned: the
    same components without a boolean copy of the volume."""
    if list(values) == [value] and labels.dtype.kind == "u":
        return labels
    return labels == value
