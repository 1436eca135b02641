"""Bundle code of a medseg MONAI bundle (``scripts/medseg_bundle.py``): the steps of medseg's ``segment``
that MONAI has no transform for, and the loop ``configs/inference.json`` runs.

Standalone on purpose: it needs numpy, scipy, nibabel, torch and MONAI only (not medseg). It mirrors
``pipeline.transforms.antialias``, ``pipeline.transforms.normalize`` (per-channel ``auto``: CT clip +
z-score, body z-score), ``pipeline.infer.ensemble`` (TTA mirror), ``pipeline.infer.sliding`` (2D networks
slice-wise) and ``pipeline.postprocess`` (restrict_to_body, component rules) of the medseg version named
in ``configs/metadata.json``.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
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
    """Class probabilities (C, *spatial) to a label map (1, *spatial), uint8: binary models, P(class 1)
    >= ``threshold`` (None: > 0.5); more classes, the argmax; a label map (1, *spatial) as it is."""

    def __init__(self, keys, threshold=None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.threshold = threshold

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            probs = d[key]
            if probs.shape[0] == 1:  # already a label map (inverted at the nearest voxel): as uint8
                labels = probs.round()
            elif probs.shape[0] == 2:
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
            postprocessing({"pred": pred, "image": item["image"], "source": item.get("source")})
            done += 1
            log.info("segmented %s", item["image"].meta.get("filename_or_obj", done))
    return done


# --- several input channels ---------------------------------------------------------------------------

def case_list(dataset_dir, channels: int) -> list[dict]:
    """The cases of ``dataset_dir``: one dict per case, ``image`` its file (one channel, or a 4D NIfTI of
    ``channels`` volumes) or, for ``<case>_0000.nii.gz`` ... ``<case>_000{N-1}.nii.gz``, the list of its
    channel files in order (the case is named by its ``_0000`` file)."""
    import glob
    import os
    import re

    files = sorted(glob.glob(os.path.join(dataset_dir, "*.nii.gz")) + glob.glob(os.path.join(dataset_dir, "*.nii")))
    if channels == 1:
        return [{"image": f} for f in files]
    by_case: dict = {}
    singles = []
    for f in files:
        found = re.match(r"(.*)_(\d{4})\.nii(\.gz)?$", f)
        if found:
            by_case.setdefault(found.group(1), {})[int(found.group(2))] = f
        else:
            singles.append(f)
    out = [{"image": f} for f in singles]  # 4D NIfTI files
    for case, parts in sorted(by_case.items()):
        if sorted(parts) != list(range(channels)):
            raise ValueError(f"case '{os.path.basename(case)}' has channel files {sorted(parts)}: expected "
                             f"_0000 ... _{channels - 1:04d} (one file per channel on channel 0's grid), or "
                             f"one 4D NIfTI with {channels} volumes")
        out.append({"image": [parts[c] for c in range(channels)]})
        _check_same_grid(out[-1]["image"])
    return sorted(out, key=lambda d: d["image"] if isinstance(d["image"], str) else d["image"][0])


def _check_same_grid(files) -> None:
    """MONAI's loader stacks channel files as they are: refuse channels on another grid than channel 0's
    (headers only; 1e-3 mm tolerance, as nnU-Net)."""
    import os

    import nibabel as nib

    first = nib.load(files[0])
    for c, f in enumerate(files[1:], start=1):
        other = nib.load(f)
        if other.shape[:3] != first.shape[:3] or not np.allclose(other.affine, first.affine, atol=1e-3):
            raise ValueError(f"channel {c} of case '{os.path.basename(files[0])}' ({os.path.basename(f)}) is on "
                             f"another grid (shape {other.shape[:3]}, affine {np.round(other.affine, 3).tolist()}) "
                             f"than channel 0 (shape {first.shape[:3]}, affine {np.round(first.affine, 3).tolist()}): "
                             "the bundle needs every channel on channel 0's grid; resample them first "
                             "(medseg segment does)")


class CheckChannelsd(MapTransform):
    """Refuse an image (C, *spatial) that has not ``channels`` channels, naming its file."""

    def __init__(self, keys, channels: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels = int(channels)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].shape[0] != self.channels:
                source = d[key].meta.get("filename_or_obj", key)
                raise ValueError(f"'{source}' has {d[key].shape[0]} channel(s), the model takes {self.channels}: "
                                 "give <case>_0000 ... files (one per channel, on channel 0's grid) or a 4D NIfTI")
        return d


# --- intensity normalisation (spec preprocess.normalisation, per channel) -------------------------------

MIN_BODY_FRACTION = 0.05


def normalize_channel_(x: torch.Tensor, norm: dict) -> torch.Tensor:
    """One channel normalised in place by its spec entry, as medseg's preprocessing does it."""
    scheme = norm["scheme"]
    if scheme == "window":
        low, high = norm["low"], norm["high"]
        return x.clamp_(low, high).sub_(low).div_(high - low)
    if scheme == "ct":  # MONAI's ScaleIntensityRange with the z-scored clip ends: (clip(x) - mean) / std
        from monai.transforms import ScaleIntensityRange

        low, high = norm["clip"]
        std = max(norm["std"], 1e-8)
        scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=(low - norm["mean"]) / std,
                                    b_max=(high - norm["mean"]) / std, clip=True)
        return x.copy_(torch.as_tensor(scale(getattr(x, "as_tensor", lambda: x)())))
    if scheme == "zscore":  # MONAI's NormalizeIntensity over the whole channel
        mean, std = float(x.mean()), float(x.std(unbiased=False))
        return x.sub_(mean).div_(std) if std != 0 else x.sub_(mean)
    # zscore_body: mean and std of the voxels above the image's minimum (all of them, if under 5 %)
    body = x > x.min()
    values = x[body] if int(body.sum()) >= norm.get("min_body_fraction", MIN_BODY_FRACTION) * x.numel() \
        else x.reshape(-1)
    mean, std = float(values.mean()), float(values.std()) if values.numel() > 1 else 0.0
    return x.sub_(mean).div_(max(std, 1e-8))


class NormalizeChannelsd(MapTransform):
    """Each channel of ``keys`` (C, *spatial) normalised by its entry of ``channels`` (the spec's
    ``preprocess.normalisation``: window, zscore, ct, zscore_body)."""

    def __init__(self, keys, channels, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.channels = [dict(c) for c in channels]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] != len(self.channels):
                raise ValueError(f"the image has {image.shape[0]} channel(s), the model takes {len(self.channels)} "
                                 f"({[c['channel'] for c in self.channels]})")
            for c, norm in enumerate(self.channels):
                normalize_channel_(image[c], norm)
        return d


def any_channel_above_its_min(x):
    """Crop-to-body selection of ``mode: auto`` models: any channel above its own minimum."""
    spatial = tuple(range(1, x.ndim))
    return x > x.amin(dim=spatial, keepdim=True)


FOREGROUND = {"above_zero": lambda x: x > 0, "above_min": above_minimum,
              "any_channel_above_its_min": any_channel_above_its_min}


# --- test-time mirroring ----------------------------------------------------------------------------------

def mirror_flips(axes, spatial_dims: int = 3) -> list:
    """Tensor dims to flip for each pass over a (B, C, *spatial) window: every subset of ``axes``."""
    import itertools

    dims = [2 + int(a) for a in (range(spatial_dims) if axes is None else sorted(axes))]
    return [c for n in range(len(dims) + 1) for c in itertools.combinations(dims, n)]


class MedsegInferer(SlidingWindowInferer):
    """MONAI's sliding window for what plain ``SlidingWindowInferer`` cannot do: ``inference.tta: mirror``
    (the windows blend the mean softmax of the network on every flip of each window batch, as
    ``pipeline.infer.ensemble``) and 2D networks (``spatial_dims=2``: windows of depth 1 through the
    volume, each run as one 2D image; ``roi_size`` then ends with 1)."""

    def __init__(self, tta: str = "none", tta_axes=None, spatial_dims: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.mirrored, self.spatial_dims = tta == "mirror", int(spatial_dims)
        self.flips = mirror_flips(tta_axes, self.spatial_dims)

    def __call__(self, inputs, network, *args, **kwargs):
        flips = self.flips

        def slice_wise(x):  # (B, C, X, Y, 1) -> (B, K, X, Y, 1)
            return network(x[..., 0])[..., None]

        forward = slice_wise if self.spatial_dims == 2 else network

        def averaged(x):
            total = None
            for dims in flips:
                probs = torch.softmax(forward(x.flip(dims) if dims else x).float(), dim=1)
                probs = probs.flip(dims) if dims else probs
                total = probs if total is None else total.add_(probs)
            return total.div_(len(flips))

        return super().__call__(inputs, averaged if self.mirrored else forward, *args, **kwargs)


# --- restrict_to_body -------------------------------------------------------------------------------------

class KeepSourced(MapTransform):
    """Keep channel 0 as read (before any spatial step) under ``name``, as a plain array: the body mask
    of ``postprocess.restrict_to_body`` is computed from it on the source grid."""

    def __init__(self, keys, name: str = "source", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.name = name

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.name] = np.array(d[key][0].detach().cpu().numpy(), dtype=np.float32)
        return d


def largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = _components(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    return components == int(np.argmax(sizes))


class RestrictToBodyd(MapTransform):
    """Remove each 26-connected component of the classes ``values`` with more than half of its voxels
    outside the body: the largest component of channel 0's crop-to-body voxels (channel 0 normalised by
    ``norm``, then ``foreground``), on the source grid."""

    def __init__(self, keys, values, norm, foreground, source_key: str = "source", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.values, self.norm, self.rule, self.source_key = [int(v) for v in values], dict(norm), foreground, \
            source_key

    def __call__(self, data):
        d = dict(data)
        x = torch.from_numpy(np.array(d[self.source_key], dtype=np.float32))[None]
        normalize_channel_(x[0], self.norm)
        body = largest_component(FOREGROUND[self.rule](x)[0].numpy())
        for key in self.key_iterator(d):
            labels = d[key]
            array = labels.detach().cpu().numpy()[0].copy()
            if body.shape != array.shape:
                raise ValueError(f"body mask shape {body.shape} differs from the labels' {array.shape}")
            for value in self.values:
                components, count = _components(array == value)
                sizes = np.bincount(components.ravel(), minlength=count + 1)
                inside = np.bincount(components.ravel(), weights=body.ravel(), minlength=count + 1)
                outside = np.flatnonzero(inside * 2 < sizes)
                array[np.isin(components, outside[outside != 0])] = 0
            d[key] = labels.clone().copy_(torch.from_numpy(array[None]))
        return d
