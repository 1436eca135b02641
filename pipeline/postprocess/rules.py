"""Post-processing rules on the source grid, by class (``postprocess.*`` and ``inference.min_component_mm3``).

Applied in this order by :func:`apply_postprocessing` (``Segmenter.finish`` calls it):

1. ``postprocess.restrict_to_body``: each 26-connected component of such a class with most of its voxels
   (more than half) outside the body is removed. The body is the largest connected component of the
   voxels preprocessing keeps for ``crop_foreground`` (:func:`pipeline.transforms.preprocess.body_floor`),
   computed from the scan's first channel as read.
2. ``inference.min_component_mm3``: components (of every class) smaller than this volume are removed.
3. ``postprocess.keep_largest``: only the largest component of such a class is kept.

``medseg cv`` chooses them from the out-of-fold predictions (:mod:`pipeline.cv.select`). With
the defaults (empty lists, 0 mm³) the labels are returned unchanged.
"""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.io.geometry import voxel_volume_mm3
from pipeline.postprocess.components import foreground_box, label_components, remove_small_components
from pipeline.postprocess.slab_components import SlabComponents


def apply_postprocessing(labels: np.ndarray, affine: np.ndarray, image: Optional[np.ndarray],
                         config: Config, in_place: bool = False) -> np.ndarray:
    """``labels`` (the source grid, with its ``affine``) after the config's rules; ``image``: the scan's
    first channel as read, needed only for ``postprocess.restrict_to_body``. A new array when anything
    changes; ``labels`` itself otherwise. ``in_place``: small components (``inference.min_component_mm3``)
    are removed in ``labels`` itself, without a copy of the volume (the caller owns it)."""
    rules = config.postprocess
    out = labels
    if rules.restrict_to_body:
        if image is None:
            raise ConfigError("postprocess.restrict_to_body needs the scan's intensities (the body mask), "
                              "and none were given")
        body = body_mask(image, config)
        for value in class_values(config, rules.restrict_to_body, "postprocess.restrict_to_body"):
            out = remove_outside(out, value, body)
    min_mm3 = config.inference.min_component_mm3
    if min_mm3 > 0:
        out = remove_small_components(out, min_mm3 / voxel_volume_mm3(affine), in_place=in_place and out is labels)
    for value in class_values(config, rules.keep_largest, "postprocess.keep_largest"):
        out = keep_largest_component(out, value)
    return out


def class_values(config: Config, names: Iterable[str], key: str) -> list[int]:
    """The label values of class ``names`` (``data.labels``); an unknown or background name is a ConfigError."""
    labels = config.data.labels
    values = []
    for name in names:
        if labels.get(name, 0) == 0:
            foreground = [n for n, v in sorted(labels.items(), key=lambda kv: kv[1]) if v != 0]
            raise ConfigError(f"config key '{key}' names {name!r}, which is not a foreground class of the model: "
                              f"expected one of {foreground}")
        values.append(int(labels[name]))
    return values


def body_mask(image: np.ndarray, config: Config) -> np.ndarray:
    """The body: the largest connected component of the voxels above preprocessing's intensity floor."""
    from pipeline.transforms.preprocess import body_floor

    return largest_component(body_floor(image, config.preprocess, config.data.channels).numpy())


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` (ties: the first found); ``mask`` itself with one or none.

    Labelled slab by slab (:class:`~pipeline.postprocess.slab_components.SlabComponents`): the result is
    the only full-size array made (a mask of other than 3 dimensions: one full-volume labelling)."""
    if mask.ndim != 3:
        labels, count = label_components(mask)
        if count <= 1:
            return mask
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        return labels == int(np.argmax(sizes))
    components = SlabComponents(mask if mask.dtype == bool or mask.dtype.kind == "u" else mask > 0)
    if components.count <= 1:
        return mask
    largest = int(np.argmax(components.sizes)) + 1
    kept = np.zeros(mask.shape, dtype=bool)
    for k0, k1, slab in components.slabs(only=[largest]):
        kept[k0:k1] = slab == largest
    return kept


def keep_largest_component(labels: np.ndarray, value: int) -> np.ndarray:
    """``labels`` with every component of class ``value`` but the largest set to 0 (ties: the first found)."""
    box = foreground_box(labels == value)
    if box is None:
        return labels
    inside = labels[box]
    components = SlabComponents(inside, value)
    if components.count <= 1:
        return labels
    largest = int(np.argmax(components.sizes)) + 1
    out = labels.copy()
    target = out[box]
    others = [index for index in range(1, components.count + 1) if index != largest]
    for k0, k1, slab in components.slabs(only=others):
        target[k0:k1][(slab > 0) & (slab != largest)] = 0
    return out


def remove_outside(labels: np.ndarray, value: int, body: np.ndarray) -> np.ndarray:
    """``labels`` with each component of class ``value`` lying mostly (more than half) outside ``body`` set to 0."""
    if body.shape != labels.shape:
        raise ValueError(f"body mask shape {body.shape} differs from the labels' {labels.shape}")
    box = foreground_box(labels == value)
    if box is None:
        return labels
    components, count = label_components(labels[box] == value)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    inside = np.bincount(components.ravel(), weights=body[box].ravel(), minlength=count + 1)
    outside = np.flatnonzero(inside * 2 < sizes)
    outside = outside[outside != 0]
    if outside.size == 0:
        return labels
    out = labels.copy()
    out[box][np.isin(components, outside)] = 0
    return out
