"""Bundle code of a medseg MONAI bundle (``scripts/medseg_bundle.py``): the steps of medseg's ``segment``
that MONAI has no transform for, and the loop ``configs/inference.json`` runs.

Standalone on purpose: it needs numpy, scipy, torch and MONAI only (not medseg). It mirrors
``pipeline.transforms.antialias``, ``pipeline.transforms.normalize`` and ``pipeline.postprocess`` of the
medseg version named in ``configs/metadata.json``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from monai.transforms import MapTransform
from scipy import ndimage

log = logging.getLogger("medseg_bundle")
FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-neighbourhood


def voxel_spacing(affine) -> np.ndarray:
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


class AntiAliasd(MapTransform):
    """Gaussian low-pass before downsampling to ``pixdim`` mm: sigma = max(0, (zoom - 1) / 2) voxels."""

    def __init__(self, keys, pixdim, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.pixdim = np.asarray(pixdim, dtype=np.float64)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            sigma = np.maximum(0.0, (self.pixdim / voxel_spacing(image.affine) - 1.0) / 2.0)
            if np.any(sigma > 0.05):
                array = image.detach().cpu().numpy()
                smoothed = np.stack([ndimage.gaussian_filter(c, sigma, mode="nearest") for c in array])
                d[key] = image.clone().copy_(torch.from_numpy(smoothed))
        return d


def above_minimum(x):
    """Crop-to-body selection of z-score models: voxels above the image's minimum."""
    return x > x.min()


class Decided(MapTransform):
    """Class probabilities (C, *spatial) on the source grid to a label map (1, *spatial), uint8: binary
    models, P(class 1) >= ``threshold`` (None: > 0.5); more classes, the argmax."""

    def __init__(self, keys, threshold=None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.threshold = threshold

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            probs = d[key]
            if probs.shape[0] == 2:
                p = probs[1:2]
                labels = p >= self.threshold if self.threshold is not None else p > 0.5
            else:
                labels = probs.argmax(dim=0, keepdim=True)
            d[key] = labels.to(torch.uint8)
        return d


def _components(mask: np.ndarray):
    return ndimage.label(mask, structure=FULL_CONNECTIVITY)


class RemoveSmallComponentsd(MapTransform):
    """Remove every 26-connected component (per class) smaller than ``min_mm3`` on the label map's grid."""

    def __init__(self, keys, min_mm3: float, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.min_mm3 = float(min_mm3)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            labels = d[key]
            array = labels.detach().cpu().numpy()[0].copy()
            min_voxels = self.min_mm3 / float(np.prod(voxel_spacing(labels.affine)))
            for value in np.unique(array[array > 0]):
                components, count = _components(array == value)
                sizes = np.bincount(components.ravel(), minlength=count + 1)
                small = np.flatnonzero(sizes < min_voxels)
                array[np.isin(components, small[small != 0])] = 0
            d[key] = labels.clone().copy_(torch.from_numpy(array[None]))
        return d


class KeepLargestd(MapTransform):
    """Keep only the largest 26-connected component of each class in ``values`` (ties: the first found)."""

    def __init__(self, keys, values, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.values = [int(v) for v in values]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            labels = d[key]
            array = labels.detach().cpu().numpy()[0].copy()
            for value in self.values:
                components, count = _components(array == value)
                if count > 1:
                    sizes = np.bincount(components.ravel())
                    sizes[0] = 0
                    array[(components > 0) & (components != int(np.argmax(sizes)))] = 0
            d[key] = labels.clone().copy_(torch.from_numpy(array[None]))
        return d


def segment_all(dataset, network, inferer, postprocessing, device) -> int:
    """Run every case of ``dataset`` (preprocessed dicts) through the network and ``postprocessing``
    (which inverts the preprocessing and saves the mask); the number of cases written."""
    network = network.to(device).eval()
    done = 0
    with torch.no_grad():
        for item in dataset:
            image = item["image"].unsqueeze(0).to(device)
            pred = inferer(image, network)[0].cpu()
            postprocessing({"pred": pred, "image": item["image"]})
            done += 1
            log.info("segmented %s", item["image"].meta.get("filename_or_obj", done))
    return done
